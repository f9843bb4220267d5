"""The token calibrators of each variant: fitted, validated and one selected (calq.calib)."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from calq import models
from calq.calib import calibrators, hidden, select
from calq.calib.base import FitData, split
from calq.errors import located
from calq.pipeline import Context, raised_versions
from calq.runs import atomic_path, write_json
from calq.stages import KINDS, StageKind


@KINDS.register
class Calibrate(StageKind):
    kind, pattern, group, words, order = "calibrate", "calibrate/<variant>", "calibrate", "calibration", 80
    outputs = {"calibrators": "calibrators/{variant}"}

    @classmethod
    def add_stages(cls, table) -> None:
        spec = table.recipe.calibrators
        if spec is None:
            return
        settings = spec.model_dump(exclude={"data", "fit_records", "heldout_records"})
        versions = [*raised_versions(calibrators.TOKEN, table.recipe.calibrator_names()), *table.raised(cls)]
        text = ("validation_text",) if spec.validation_text is not None else ()
        for name, needs in table.model.items():
            table.add(f"calibrate/{name}", stage_calibrate, name, needs=("instructions", *text, *needs),
                      settings=[settings, *versions] if versions else settings)
            table.calibrators[name] = (f"calibrate/{name}",)


def stage_calibrate(ctx: Context, name: str):
    """Cache this model's hidden states on the fit and held-out responses (and the validation text); fit every
    calibrator the recipe lists on the fit records' training split, validate them on its validation split and on the
    validation text, and select one (calq.calib.select)."""
    spec = ctx.recipe.calibrators
    model, tokenizer = models.load(ctx.variant_source(name), ctx.recipe.model.dtype, ctx.recipe.model.device_map)
    records = json.loads(ctx.output("instructions", "records").read_text())
    final = ctx.output("calibrate", "calibrators", variant=name)
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        caches = {}
        for part in ("fit", "heldout"):
            caches[part] = hidden.cache_hidden(model, tokenizer, records[part], tmp / f"{part}_hidden.safetensors",
                                               max_len=spec.max_len, where="calibrators.data",
                                               progress=ctx.track(f"hidden states {name} ({part})", len(records[part])))
        text = None
        if spec.validation_text is not None:
            windows = load_file(str(ctx.output("validation_text", "windows")))["input_ids"]
            caches["text"] = hidden.cache_windows(model, windows, tmp / "text_hidden.safetensors",
                                                  progress=ctx.track(f"hidden states {name} (text)", len(windows)))
            text = hidden.load_cached(tmp / "text_hidden.safetensors")
        cached = hidden.load_cached(tmp / "fit_hidden.safetensors")
        train, val = split(len(cached), spec.val_fraction, spec.seed)
        bar = ctx.track(f"fit calibrators {name}", None)
        data = FitData(cached, train, val, hidden.Logits(model), model.config, spec.logits_chunk,
                       progress=(lambda what, done, total: bar(done, total, f"{what} {name}")) if bar else None)
        fitted, validation, selected = calibrators.fit_all(data, spec.settings(), spec.select_by, text=text)
        calibrators.save_all(fitted, tmp)
        worst = {n: select.worst_change(validation, n, spec.select_by) for n in fitted}
        write_json(tmp / "calibrators.json", {"selected": selected, "validation": validation,
                                              "select_by": spec.select_by, "worst_change": worst,
                                              "fit": {n: c.fit_info for n, c in fitted.items()}, "caches": caches})
    return {"calibrators": final}, {"selected": selected, "validation": validation, "worst_change": worst}


def load_calibrators(ctx: Context, name: str, config) -> tuple[dict, dict]:
    """{calibrator name: calibrator} for this variant, and what calibrators.json recorded ({} without calibrators)."""
    if ctx.recipe.calibrators is None:
        return {"none": calibrators.TOKEN.get("none")()}, {}
    folder = ctx.output("calibrate", "calibrators", variant=name)
    fitted = json.loads((folder / "calibrators.json").read_text())
    with located(f"calibrators/{name}"):
        return calibrators.load_all(folder, config, ctx.recipe.calibrator_names()), fitted
