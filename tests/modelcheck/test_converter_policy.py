"""check_model_converter fails on what it did not check (unless allowed), and a pytest report holds each model check."""

from __future__ import annotations

import copy
import json

import pytest

pytest_plugins = ["pytester"]


def _lstm_net(torch):
    class LstmNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 3, batch_first=True, proj_size=2)  # no spec checks a projected LSTM yet
            self.fc = torch.nn.Linear(2, 3)

        def forward(self, x):
            h, _ = self.lstm(x)
            return self.fc(h[:, -1])

    return LstmNet().eval()


def test_inconclusive_fails_the_test_listing_the_unchecked_layers(torch):
    from equivcheck import check_model_converter
    from equivcheck.errors import ConversionCheckFailed

    net = _lstm_net(torch)
    with pytest.raises(ConversionCheckFailed) as info:
        check_model_converter(copy.deepcopy, net, input_shape=(2, 5, 4))
    first = str(info.value).splitlines()[0]
    assert first.startswith("model check inconclusive: unchecked: source lstm (LSTM, 102 weights")  # 48+24+24+6
    assert "proj_size=2" in first
    assert "unchecked: converted lstm (LSTM" in first and "allow_unchecked=" in first
    assert info.value.record.verdict == "inconclusive"  # the ModelCheck, for code that catches the failure


@pytest.mark.parametrize("allowed, accepted", [
    (("lstm",), True), ("l*", True), (("source:lstm",), False), (("source:lstm", "converted:lstm"), True),
    (("fc",), False), ((), False)])
def test_allow_unchecked_takes_names_and_patterns(torch, allowed, accepted):
    from equivcheck.modelcheck.check import check_models
    from equivcheck.modelcheck.policy import not_accepted

    net = _lstm_net(torch)
    result = check_models(net, copy.deepcopy(net), input_shape=(2, 5, 4))
    assert result.verdict == "inconclusive"
    assert (not not_accepted(result, allowed)) is accepted


def test_allowed_layers_return_the_result_and_fail_still_fails(torch):
    from equivcheck import check_model_converter
    from equivcheck.errors import ConversionCheckFailed, SpecError

    net = _lstm_net(torch)
    result = check_model_converter(copy.deepcopy, net, input_shape=(2, 5, 4), allow_unchecked=["lstm"])
    assert result.verdict == "inconclusive"

    def wrong(model):
        out = copy.deepcopy(model)
        with torch.no_grad():
            out.fc.weight.mul_(-1)
        return out

    with pytest.raises(ConversionCheckFailed, match="first divergence: fc ↔ fc"):
        check_model_converter(wrong, net, input_shape=(2, 5, 4), allow_unchecked=["*"])
    with pytest.raises(SpecError, match="allow_unchecked=3 is not valid"):
        check_model_converter(copy.deepcopy, net, input_shape=(2, 5, 4), allow_unchecked=3)


MODEL_TESTS = '''
import copy
import torch
from equivcheck import check_model_converter

def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))

def test_right():
    check_model_converter(copy.deepcopy, make, input_shape=(2, 2, 6, 6))

def test_wrong():
    def convert(model):
        out = copy.deepcopy(model)
        with torch.no_grad():
            out[0].weight.copy_(out[0].weight.flip(-1))
        return out
    check_model_converter(convert, make, input_shape=(2, 2, 6, 6))
'''


def test_a_pytest_report_holds_one_case_per_model_check(torch, pytester: pytest.Pytester):
    pytester.makepyfile(test_models=MODEL_TESTS)
    run = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", "--equivcheck-report=out")
    run.assert_outcomes(passed=1, failed=1)
    data = json.loads((pytester.path / "out" / "equivcheck.json").read_text())
    checks = data["extra"]["modelchecks"]
    assert [(c["test"].split("::")[-1], c["verdict"]) for c in checks] == [("test_right", "pass"), ("test_wrong", "fail")]
    assert checks[1]["first_divergence"]["source"] == "0" and "flip" in checks[1]["first_divergence"]["headline"]
    md = (pytester.path / "out" / "equivcheck.md").read_text()
    assert "Model checks" in md and "First wrong layer" in md
    assert "Sequential" in (pytester.path / "out" / "equivcheck.html").read_text()
