"""Bad input on the command line ends in one `error:` line naming the problem and exit status 2,
never a traceback."""

import os
import subprocess
import sys

import pytest

CASES = {
    "unknown preset": (["spellm_jax.train", "--config=configs/llama.py:nope"],
                       "unknown preset 'nope'"),
    "unknown override": (["spellm_jax.train", "--config.train.stepz=3"],
                         'Did you mean "steps"'),
    "unknown trainable set": (["spellm_jax.train", "--config.train.trainable=everything"],
                              "train.trainable='everything' is not one of heads"),
    "unknown decoder kind": (["spellm_jax.train", "--config.heads.kind=nope"],
                             "heads.kind='nope' is not one of"),
    "wrongly typed value": (["spellm_jax.train", "--config.train.steps=abc"],
                            "--config.train.steps=abc"),
    "not a GGUF file": (["spellm_jax.convert", "--source={not_gguf}", "--out={tmp}/converted"],
                        "is not a GGUF file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(case, tmp_path):
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_text("not a model")
    module, *args = CASES[case][0]
    args = [a.format(not_gguf=not_gguf, tmp=tmp_path) for a in args]
    if module == "spellm_jax.train":
        args.append(f"--workdir={tmp_path / 'run'}")
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                            text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and CASES[case][1] in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "converted").exists()
