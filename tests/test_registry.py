"""One registry type (calq.registry): a method, a calibrator and an exporter added from this file alone are used by
calq, what a calibrator can do travels with it (its version enters the calibrate key, its `fuse` tells exporters), a
name registered twice is refused, and a plugin package is found through its entry point."""

import contextlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar, Literal

import pytest
import torch
from transformers import AutoModelForCausalLM

import calq
from calq import models, pipeline
from calq.calib import calibrators
from calq.calib import registry as calib_registry
from calq.calib.ats import AtsHead
from calq.calib.base import NoCalibration, identity
from calq.calib.base import register as register_calibrator
from calq.calib.temperature import Temperature
from calq.errors import CalqError
from calq.export import base as export_base
from calq.quant import base as quant_base
from calq.quant.base import MethodConfig
from calq.recipe import parse_recipe


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """Whatever a test registers is gone after it."""
    for registry in (quant_base.REGISTRY, calibrators.TOKEN, calibrators.ANSWER, export_base.EXPORTERS):
        monkeypatch.setattr(registry, "_classes", dict(registry.discover()._classes))


class Halve(MethodConfig):
    """A method that reads no data and halves every weight."""

    method: Literal["halve"] = "halve"
    schemes: ClassVar = ("w8a8",)

    def needs_data(self) -> bool:
        return False

    def quantize(self, model, samples):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        return model


class Sharp(Temperature):
    """A temperature under another name: it inherits how an exporter fuses it."""

    name = "sharp"
    version = 1  # its own first version, not Temperature's


class Unfusable(NoCalibration):
    name = "unfusable"
    fuse = None


class Echo(export_base.Exporter):
    name = "echo"
    calibrators = ("none", "temperature")
    runtime = "json"


class Copy(export_base.Exporter):
    """A format that is the checkpoint folder itself with the temperature beside it, run by PyTorch in this process."""

    name = "copy"
    calibrators = ("none", "temperature")
    runtime = "transformers"

    def export(self, checkpoint_dir, out_dir, calibrator=None) -> dict:
        shutil.copytree(checkpoint_dir, out_dir, dirs_exist_ok=True)
        (Path(out_dir) / "temperature.json").write_text(json.dumps(getattr(calibrator, "temperature", 1.0)))
        return export_base.write_info(out_dir, {"format": self.name, "changes": []})

    def session(self, out_dir, threads: int = 1):
        model, _ = models.load(models.ModelSource(str(out_dir), kind="folder"), "float32")
        temperature = json.loads((Path(out_dir) / "temperature.json").read_text())
        return SimpleNamespace(score=lambda ids: model(input_ids=ids).logits / temperature)

    def isolated(self, factory, out_dir, *args, **kwargs):  # a pure-PyTorch runtime cannot crash the process
        return contextlib.nullcontext(factory(out_dir, *args, **kwargs))


@pytest.fixture
def recipe(tiny_model, texts, alpaca) -> dict:
    return {
        "name": "plugins", "model": {"id": str(tiny_model)},
        "calibration": {"data": {"source": str(texts["calib"])}, "num_samples": 8, "seq_len": 32,
                        "allow_any_size": True},
        "variants": [{"method": "minmax", "scheme": "w8a8"}],
        "evaluation": {"tokens": {"data": {"source": str(texts["heldout"])}, "max_tokens": 2048, "seq_len": 64}},
        "calibrators": {"data": {"source": str(alpaca)}, "fit_records": 30, "heldout_records": 10, "use": ["sharp"]},
        "export": {"formats": ["echo"], "calibrator": "sharp"},
    }


def keys(recipe: dict) -> dict[str, str]:
    return {s.name: s.key for s in pipeline.plan(parse_recipe(recipe), None).stages}


def test_a_method_from_this_file_quantizes(tiny_model):
    quant_base.register(Halve)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = model.lm_head.weight.clone()
    calq.quantize(model, {"method": "halve", "scheme": "w8a8"})
    assert torch.equal(model.lm_head.weight, before * 0.5)
    with pytest.raises(CalqError, match="unknown method 'halv'.*halve"):
        calq.quantize(model, {"method": "halv", "scheme": "w8a8"})


def test_a_calibrator_and_an_exporter_from_this_file_are_planned(recipe):
    register_calibrator(Sharp)
    export_base.register(Echo)
    plan = keys(recipe)  # the recipe takes both names; the plan checks the exporter can fuse the calibrator
    assert {"calibrate/baseline", "export/baseline/echo", "export/minmax-w8a8/echo"} <= set(plan)
    name, fitted = calibrators.parse("sharp:2", None)
    assert name == "sharp" and export_base.calibrator_kind(fitted) == "temperature" and fitted.temperature == 2
    with pytest.raises(CalqError, match="echo cannot hold the ats calibrator"):
        keys({**recipe, "calibrators": {**recipe["calibrators"], "use": ["ats"]}, "export": {"formats": ["echo"],
                                                                                             "calibrator": "ats"}})
    with pytest.raises(CalqError, match="calibrator 'unfusable' cannot be fused"):
        export_base.calibrator_kind(Unfusable())


def test_a_calibrators_version_reruns_its_calibrate_stages_only(recipe, monkeypatch):
    register_calibrator(Sharp)
    recipe["export"] = None
    first = keys(recipe)
    calibrate = next(s for s in pipeline.plan(parse_recipe(recipe), None).stages if s.name == "calibrate/baseline")
    assert isinstance(calibrate.settings, dict)  # version 1 adds nothing: keys of earlier runs stay valid
    monkeypatch.setattr(Sharp, "version", 2)
    second = keys(recipe)
    changed = {name for name in first if first[name] != second[name]}
    assert changed == {"calibrate/baseline", "calibrate/minmax-w8a8", "evaluate/baseline", "evaluate/minmax-w8a8"}


def test_a_name_registered_twice_is_refused():
    class Other(Temperature):
        name = "temperature"

    with pytest.raises(ValueError, match="two calibrators are named 'temperature': calq.calib.temperature.Temperature"):
        register_calibrator(Other)
    register_calibrator(Temperature)  # the same class again is no duplicate

    class Minmax(Halve):
        method: Literal["minmax"] = "minmax"

    with pytest.raises(ValueError, match="two methods are named 'minmax'"):
        quant_base.register(Minmax)
    with pytest.raises(ValueError, match="two export formats are named 'onnx'"):
        export_base.register(type("Onnx", (Echo,), {"name": "onnx"}))


def test_a_plugin_package_is_found_through_its_entry_point(tmp_path, monkeypatch):
    (tmp_path / "calq_test_plugin.py").write_text(
        "from calq.calib.base import register\n"
        "from calq.calib.temperature import Temperature\n\n\n"
        "@register\n"
        "class Plugged(Temperature):\n"
        "    name = 'plugged'\n")
    dist = tmp_path / "calq_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: calq-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[calq.calibrators]\nplugged = calq_test_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(calibrators.TOKEN, "_plugged_in", False)  # as in a fresh process with the plugin installed
    assert "plugged" in calib_registry.names("token")  # what the recipe checks a calibrators.use against
    assert calibrators.TOKEN.get("plugged").fuse == "temperature"


def test_a_method_registered_after_import_is_taken_by_the_recipe(recipe):
    recipe = {**recipe, "calibrators": None, "export": None,
              "variants": [{"method": "halve", "scheme": "w8a8", "name": "half"}]}
    with pytest.raises(CalqError, match="variants"):
        parse_recipe(recipe)
    quant_base.register(Halve)  # as a plugin's module does when its entry point is loaded after calq
    assert isinstance(parse_recipe(recipe).variants[0], Halve)
    with pytest.raises(CalqError, match=r"variants\[0\]\.scheme"):
        parse_recipe({**recipe, "variants": [{"method": "halve", "scheme": 8}]})


def test_an_exporter_from_this_file_exports_and_verifies_in_a_run(recipe, working_model, tmp_path):
    export_base.register(Copy)
    recipe = {**recipe, "model": {"id": str(working_model)}, "calibrators": None,
              "export": {"formats": ["copy"], "variants": ["baseline"], "calibrator": "none", "max_tokens": 256}}
    out = tmp_path / "run"
    report = calq.run(recipe, out=out)
    assert [(r["variant"], r["format"], r["calibrator"]) for r in report.data["deployed"]] == [
        ("baseline", "copy", "none")]
    assert (out / "export" / "baseline" / "copy" / "config.json").is_file()
    verified = json.loads((out / "export" / "baseline" / "copy" / "verify.json").read_text())
    assert verified["load_seconds"] is None  # its own `isolated` times nothing; the report shows a dash
    marker = out / ".calq" / "stages" / "export" / "baseline" / "copy.json"
    written = marker.stat().st_mtime_ns
    calq.run(recipe, out=out)
    assert marker.stat().st_mtime_ns == written  # reused


def test_what_a_format_holds_and_falls_back_to_travels_with_it():
    register_calibrator(Sharp)
    echo = Echo()
    assert echo.holds(None) and echo.holds(Sharp) and not echo.holds(Unfusable) and not echo.holds(AtsHead)
    assert echo.fallback({"none": identity, "unfusable": Unfusable(), "sharp": Sharp(2.0)}) == "sharp"
    assert echo.fallback({"none": identity, "unfusable": Unfusable()}) == "none"
    assert not Copy.reads_tokenizer and export_base.get("gguf").reads_tokenizer
    with pytest.raises(CalqError, match="calibrator 'sharp' needs an argument"):
        calibrators.parse("sharp", None)
    assert calibrators.parse(None, None) == ("none", identity)
