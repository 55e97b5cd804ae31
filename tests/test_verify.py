"""checkpoint_utils.verify: exit 0 on a faithful conversion, 1 on a wrong one, 2 on bad input."""
from __future__ import annotations

import re

import pytest

from checkpoint_utils import verify
from checkpoint_utils.convert_hf import convert, load_converted_params
from checkpoint_utils.rounding import logits_atol, longest_sum
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


def test_default_tolerance_is_the_rounding_bound_of_this_model(two_models, capsys):
    """The bound named on the verdict line is logits_atol for the converted model's depth and
    width, the 16-token rows and the reference's largest |logit| (printed to 3 digits, the
    tolerance to 2: hence rtol 5e-2)."""
    a, _, converted = two_models
    assert verify.main(["--source", a, "--converted", converted]) == 0
    verdict = capsys.readouterr().out.splitlines()[-1]
    found = re.fullmatch(r"OK: worst \S+ vs tolerance (\S+) \(float32 rounding bound: (\d+) blocks, sums of up to "
                         r"(\d+) terms, \|logits\| <= (\S+)\)", verdict)
    assert found, verdict
    model = load_converted_params(converted)
    assert (int(found[2]), int(found[3])) == (model.num_hidden_layers, longest_sum(model, 16))
    assert float(found[1]) == pytest.approx(logits_atol(model, 16, float(found[4])), rel=5e-2)


def test_tolerance_flag_overrides_the_default(two_models, capsys):
    """Another model's logits differ by O(1) (they fail the default, test_other_weights_fail):
    a tolerance of 1e3 passes them, so the flag, not the bound, decided."""
    _, b, converted = two_models
    assert verify.main(["--source", b, "--converted", converted, "--tolerance", "1e3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("vs tolerance 1.0e+03 (--tolerance)")
