"""torch models: convolutionalize, verify, state dicts — on the real torch."""

from __future__ import annotations

import json

import pytest

import equivcheck as ec
from equivcheck.errors import FileFormatError
from equivcheck.fcn import HeadError
from equivcheck.fcn.commands import convolutionalize_file

CFG = (4, "M", 6, "M")


@pytest.fixture(scope="module")
def vgg(torch):
    from equivcheck.fcn import vgg

    return vgg


def tiny(vgg, torch, *, padding=1, seed=0):
    torch.manual_seed(seed)
    return vgg.VGG(CFG, hidden=12, num_classes=5, map_size=3, padding=padding).eval()


@pytest.mark.parametrize("padding", [0, 1])
def test_vgg_head_becomes_convs_with_the_same_state_dict_keys(torch, vgg, padding):
    model = tiny(vgg, torch, padding=padding)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fcn = ec.convolutionalize(model)
    assert list(fcn.state_dict()) == list(before)
    assert tuple(fcn.state_dict()["classifier.0.weight"].shape) == (12, 6, 3, 3)
    assert tuple(fcn.state_dict()["classifier.6.weight"].shape) == (5, 12, 1, 1)
    assert type(model.classifier[0]).__name__ == "Linear"  # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = ec.verify_model(model, fcn, crops=None)
    assert result.passed, result.summary()
    assert result.total_stride == (4, 4) and result.output_positions == (2, 2)
    assert result.check("crop").applicable is (padding == 0)
    assert result.check("mutants").verdict == "pass"
    json.dumps(result.to_dict())


def test_sequential_head_with_batchnorm_and_softmax(torch):
    nn = torch.nn
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 8),
                          nn.BatchNorm1d(8), nn.LeakyReLU(0.1), nn.Dropout(), nn.Linear(8, 4), nn.Softmax(dim=-1)).eval()
    model[5].running_mean.uniform_(-1, 1)
    model[5].running_var.uniform_(0.5, 2)
    fcn = ec.convolutionalize(model, input_shape=(2, 8, 8))
    assert type(fcn[5]).__name__ == "BatchNorm2d" and fcn[9].dim == 1
    result = ec.verify_model(model, fcn, input_shape=(2, 8, 8))
    assert result.passed, result.summary()
    assert model[9].dim == -1 and type(model[4]).__name__ == "Linear"


def test_global_pooling_keeps_one_position(torch):
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    fcn = ec.convolutionalize(model, input_shape=(3, 9, 9))
    result = ec.verify_model(model, fcn, input_shape=(3, 9, 9), larger=(20, 14))
    assert result.passed and result.output_positions == (1, 1)
    assert result.check("crop").verdict == "n/a" and "global pooling" in result.check("crop").detail


def test_a_wrong_kernel_is_caught(torch, vgg):
    model = tiny(vgg, torch)
    fcn = ec.convolutionalize(model)
    with torch.no_grad():
        w = fcn.classifier[0].weight
        w.copy_(w.transpose(2, 3).clone())  # H and W swapped
    result = ec.verify_model(model, fcn)
    assert result.check("training size").verdict == "fail" and result.check("sliding window").verdict == "fail"


def test_refusals(torch):
    nn = torch.nn

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 3, batch_first=True)
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.rnn(x)[0], 1))

    with pytest.raises(HeadError, match=r"'rnn' .GRU. does not map one tensor") as info:
        ec.convolutionalize(Recurrent(), input_shape=(4, 3))
    assert "\n" not in str(info.value)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(HeadError, match=r"input_shape is missing .*pass input_shape=\(C, H, W\)"):
        ec.convolutionalize(conv)
    uneven = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(HeadError, match="uneven windows"):
        ec.convolutionalize(uneven, input_shape=(1, 7, 7))
    relu = nn.ReLU()

    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu, self.fc = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 1), relu, nn.Linear(18, 2)

        def forward(self, x):
            return self.fc(self.relu(self.b(self.relu(self.a(x)))).flatten(1))

    with pytest.raises(HeadError, match=r"'relu' .ReLU. is called more than once"):
        ec.convolutionalize(Reused(), input_shape=(1, 5, 5))
    with pytest.raises(HeadError, match="neither a Keras model nor"):
        ec.convolutionalize(object())


def test_state_dict_round_trips_through_files(torch, vgg, tmp_path, capsys):
    from equivcheck import files
    from equivcheck.cli import main

    model = tiny(vgg, torch, padding=1)
    src = tmp_path / "vgg.pt"
    torch.save(model.state_dict(), src)
    rebuilt = vgg.from_state_dict(files.load_arrays(src))
    assert rebuilt.cfg == (*CFG,) and rebuilt.input_shape == (3, 12, 12)
    out = tmp_path / "vgg_conv.safetensors"
    assert main(["convolutionalize", str(src), str(out)]) == 0
    assert files.load_arrays(out)["classifier.0.weight"].shape == (12, 6, 3, 3)
    assert main(["verify-model", str(src), str(out), "--size", "16,20", "--report", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    assert "VGG (float32) — pass" in text
    doc = json.loads((tmp_path / "rep" / "equivcheck.json").read_text())
    assert doc["extra"]["models"][0]["output_positions"] == [2, 3]
    assert main(["convolutionalize", str(out), str(tmp_path / "again.pt")]) == 2
    assert "already convolutionalized" in capsys.readouterr().err


def test_whole_pickled_module_is_refused(torch, vgg, tmp_path):
    path = tmp_path / "module.pt"
    torch.save(tiny(vgg, torch), path)
    with pytest.raises(FileFormatError, match=r"pickled Python objects beyond tensors .*state_dict\(\)") as info:
        convolutionalize_file(path, tmp_path / "out.pt")
    assert "\n" not in str(info.value) and not (tmp_path / "out.pt").exists()


def test_a_foreign_state_dict_is_explained(torch, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(FileFormatError, match=r"not a VGG-style model.*equivcheck.convolutionalize\(model, input_shape"):
        convolutionalize_file(path, tmp_path / "out.pt")


def test_vgg16_layout_matches_torchvision_keys(torch, vgg):
    model = vgg.VGG(vgg.VGG16, hidden=8, num_classes=3)  # narrow head: fast, same key layout
    keys = [k for k in model.state_dict() if k.endswith("weight")]
    assert keys[:2] == ["features.0.weight", "features.2.weight"] and keys[-3:] == [
        "classifier.0.weight", "classifier.3.weight", "classifier.6.weight"]
    assert sum(k.startswith("features") for k in keys) == 13 and model.input_shape == (3, 224, 224)
    assert tuple(model.classifier[0].weight.shape) == (8, 512 * 7 * 7)


def test_a_larger_size_past_the_memory_guard_is_one_line_before_allocating(torch):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4))
    fcn = ec.convolutionalize(model, input_shape=(2, 8, 8))
    with pytest.raises(ec.SpecError, match=r"verify-model at larger=\(100000, 100000\) needs about .* more than half"):
        ec.verify_model(model, fcn, input_shape=(2, 8, 8), larger=(100000, 100000))
