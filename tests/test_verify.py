"""checkpoint_utils.verify: exit 0 on a faithful conversion, 1 on a wrong one, 2 on bad input."""
from __future__ import annotations

import pytest

from checkpoint_utils import verify
from checkpoint_utils.convert_hf import convert
from tests.hf_models import make_hf_model, save_hf_model


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    a = save_hf_model(make_hf_model("neox_basic", seed=1), str(root / "a"))
    b = save_hf_model(make_hf_model("neox_basic", seed=2), str(root / "b"))
    convert(a, str(root / "a_tf"), progress=False)
    return a, b, str(root / "a_tf")


def test_faithful_conversion_passes(two_models, capsys):
    a, _, converted = two_models
    assert verify.main(["--source", a, "--converted", converted, "--ids", "1,5,9,2"]) == 0
    out = capsys.readouterr().out
    assert "random: max |logits diff|" in out and "given: max |logits diff|" in out and "OK: worst" in out


def test_other_weights_fail(two_models, capsys):
    _, b, converted = two_models
    assert verify.main(["--source", b, "--converted", converted]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_bad_arguments(two_models, tmp_path, capsys):
    a, _, converted = two_models
    assert verify.main(["--source", a, "--converted", converted, "--ids", "1,x"]) == 2
    assert verify.main(["--source", a, "--converted", converted, "--ids", "1,500"]) == 2
    assert verify.main(["--source", a, "--converted", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "comma-separated integers" in err and "must lie in [0, 99)" in err and "is not a directory" in err
