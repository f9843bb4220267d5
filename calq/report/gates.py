"""Release gates: thresholds on a finished report, each check passed or failed, with its margin.

A recipe's `gates:` picks candidates (a variant and a calibrator, or all of them) and sets thresholds:

    gates:
      variant: minmax-w4a16-g64   # default: every quantized variant
      calibrator: ats             # default: every calibrator
      max_accuracy_drop: 0.02     # per task, below the baseline with the same calibrator
      max_ece_increase: 0.01      # per task, above the baseline's uncalibrated answer-level ECE
      max_token_ece: 0.05
      max_kld: 0.1                # mean KL(baseline ‖ variant) per token on the held-out text, every calibrator
      min_same_top1: 0.8          # share of held-out positions where the variant's top token is the baseline's
      max_answer_ece: 0.10        # per evaluation task, with each variant's selected answer calibrator; one
                                  # collapsed to uniform confidence fails it ("constant predictor")
      min_coverage: 0.2           # answered share at the threshold fitted for the first target accuracy

Each threshold yields one check per candidate (and task); a threshold with nothing to check fails, so a
gate can never pass by matching nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict, Field

from calq.errors import CalqError


class Gates(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    variant: str | None = Field(
        None, description="candidate variant the gates check (default: every quantized variant)")
    calibrator: str | None = Field(
        None, description="candidate calibrator: none, temperature or ats (default: every calibrator)")
    tasks: tuple[str, ...] | None = Field(
        None, description="tasks the task gates check (default: every evaluated task)")
    max_accuracy_drop: float | None = Field(
        None, description="largest allowed drop of a task's accuracy below the baseline's with the same calibrator, "
                          "in absolute terms (0.02 = 2 points)")
    max_ece: float | None = Field(
        None, ge=0, le=1, description="largest allowed answer-level ECE on a multiple-choice task")
    max_ece_increase: float | None = Field(
        None, description="largest allowed rise of a multiple-choice task's answer-level ECE above the baseline's "
                          "uncalibrated ('none') ECE on that task")
    max_token_ece: float | None = Field(
        None, ge=0, le=1, description="largest allowed token-level ECE on the held-out text")
    max_kld: float | None = Field(
        None, ge=0, description="largest allowed mean KL divergence per token from the unquantized baseline on the "
                                "held-out text, KL(baseline ‖ variant); with a calibrator, of the calibrated variant "
                                "from the uncalibrated baseline")
    min_same_top1: float | None = Field(
        None, ge=0, le=1, description="smallest allowed share of held-out positions where the variant's top token "
                                      "(calibrated or not) is the unquantized baseline's")
    max_deployed_ece_drift: float | None = Field(
        None, ge=0, description="largest allowed change of token-level ECE between an exported artifact on its runtime "
                                "and the PyTorch variant it came from (needs an `export:` section)")
    min_deployed_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="smallest allowed share of positions where the exported artifact's top token is "
                                      "the PyTorch variant's")

    answer_calibrator: str | None = Field(
        None, description="answer calibrator the answer gates check (default: each variant's selected one)")
    max_answer_ece: float | None = Field(
        None, ge=0, le=1, description="largest allowed answer-level ECE on an evaluation task, with the answer "
                                      "calibrator (needs evaluation.tasks.answer_calibration)")
    allow_constant_answers: bool = Field(
        False, description="let max_answer_ece pass an answer calibrator whose confidence collapsed to 1/choices (its "
                           "ECE is then |accuracy − 1/choices|: it says nothing about which answers are right); the "
                           "check is still labelled 'constant predictor'. For tasks where the model is at chance and "
                           "uniform confidence is the honest answer")
    min_auroc: float | None = Field(
        None, ge=0, le=1, description="smallest allowed AUROC of the answer confidence for right vs wrong answers")
    min_coverage: float | None = Field(
        None, ge=0, le=1, description="smallest allowed share of questions answered at the confidence threshold "
                                      "fitted for `coverage_target` accuracy")
    coverage_target: float | None = Field(
        None, gt=0, lt=1, description="target accuracy of min_coverage (default: the first of "
                                      "answer_calibration.targets)")

    def thresholds(self) -> list[str]:
        """The gates set (every max_/min_ key with a value)."""
        return [g for g in type(self).model_fields if g.startswith(("max_", "min_")) and getattr(self, g) is not None]

    def task_gates(self) -> list[str]:
        return [g for g in ("max_accuracy_drop", "max_ece", "max_ece_increase", *ANSWER_GATES)
                if getattr(self, g) is not None]


ANSWER_GATES = ("max_answer_ece", "min_auroc", "min_coverage")
CONSTANT = "constant predictor"  # note of a max_answer_ece check on an answer calibrator collapsed to uniform


@dataclass(frozen=True)
class GateResult:
    gate: str                 # e.g. "max_accuracy_drop"
    variant: str | None
    calibrator: str | None
    task: str | None          # None for token-level gates
    value: float | None       # None: nothing to check
    threshold: float
    passed: bool
    margin: float | None      # threshold - value: headroom when passed, how far over when negative
    note: str | None = None   # what a pass rests on, when it should not be read as a plain pass

    @property
    def name(self) -> str:
        where = "/".join(p for p in (self.variant, self.calibrator, self.task) if p) or "no match"
        return f"{self.gate} [{where}]"


def check_gates(gates: Gates, variants: list[str], calibrators: list[str], tasks: list[str],
                answer_calibrators: list[str] | None = None, targets: list[float] = (), where: str = "gates") -> None:
    """Before a run: every name a gate uses exists, task gates have tasks to check, answer gates have answer
    calibrators (`answer_calibrators`: none and those fitted; None without answer calibration)."""
    for key, value, known in (("variant", gates.variant, variants), ("calibrator", gates.calibrator, calibrators),
                              ("answer_calibrator", gates.answer_calibrator, answer_calibrators or [])):
        if value is not None and value not in known:
            raise CalqError(f"unknown {key} '{value}'", f"{where}.{key}",
                            f"use one of: {', '.join(known)}" if known else "add evaluation.tasks.answer_calibration")
    needs_answers = [g for g in ANSWER_GATES if getattr(gates, g) is not None]
    if needs_answers and answer_calibrators is None:
        raise CalqError(f"{needs_answers[0]} needs answer calibration, and the recipe has none",
                        f"{where}.{needs_answers[0]}", "add evaluation.tasks.answer_calibration or remove the gate")
    if gates.min_coverage is not None and not targets:
        raise CalqError("min_coverage needs a target accuracy", f"{where}.min_coverage",
                        "list one in evaluation.tasks.answer_calibration.targets")
    if gates.coverage_target is not None and gates.coverage_target not in targets:
        raise CalqError(f"coverage_target {gates.coverage_target} is not one of the targets {list(targets)}",
                        f"{where}.coverage_target", "add it to evaluation.tasks.answer_calibration.targets")
    for task in gates.tasks or ():
        if task not in tasks:
            raise CalqError(f"task '{task}' is not evaluated", f"{where}.tasks",
                            f"use one of: {', '.join(tasks)}" if tasks else "add it to the evaluation tasks")
    needs_tasks = gates.task_gates()
    if needs_tasks and not tasks:
        raise CalqError(f"{needs_tasks[0]} needs evaluation tasks, and none are listed", f"{where}.{needs_tasks[0]}",
                        "add evaluation tasks or remove the gate")


TOLERANCE = 1e-9  # a value exactly at its threshold passes despite float rounding (0.52 - 0.50 > 0.02 in floats)


def _check(gate: str, row: dict, task: str | None, value: float, threshold: float) -> GateResult:
    return GateResult(gate, row["variant"], row.get("calibrator"), task, value, threshold,
                      value <= threshold + TOLERANCE, threshold - value)


def _nothing_to_check(gate: str, gates: Gates) -> GateResult:
    return GateResult(gate, gates.variant, gates.calibrator, None, None, getattr(gates, gate), False, None)


def _task_value(gate: str, row: dict, base: dict) -> float | None:
    if gate == "max_accuracy_drop":
        return base[row["calibrator"], row["task"]]["accuracy"] - row["accuracy"]
    if row["ece"] is None:  # not a multiple-choice task: no answer-level ECE
        return None
    if gate == "max_ece":
        return row["ece"]
    return row["ece"] - base["none", row["task"]]["ece"]


def evaluate_gates(gates: Gates, report: dict, baseline: str = "baseline") -> list[GateResult]:
    """Every check of every threshold in `gates` against report.json's content (pure: no I/O).

    Task rows come from report["tasks"]["results"]; token-level rows from report["variants"] (a row
    without a `calibrator` key is uncalibrated). `baseline` is the unquantized variant's name.
    """
    def selected(row: dict) -> bool:
        variant_ok = row["variant"] == gates.variant if gates.variant else row["variant"] != baseline
        return variant_ok and gates.calibrator in (None, row.get("calibrator", "none"))

    task_rows = [r for r in (report.get("tasks") or {}).get("results", [])
                 if gates.tasks is None or r["task"] in gates.tasks]
    base = {(r["calibrator"], r["task"]): r for r in task_rows if r["variant"] == baseline}
    results = []
    for gate in (g for g in gates.task_gates() if g not in ANSWER_GATES):
        checks = [_check(gate, row, row["task"], value, getattr(gates, gate)) for row in filter(selected, task_rows)
                  if (value := _task_value(gate, row, base)) is not None]
        results += checks or [_nothing_to_check(gate, gates)]
    results += _answer_gates(gates, report, selected)
    if gates.max_token_ece is not None:
        token_rows = [{"variant": v["variant"], "calibrator": cal, "ece": m["ece"]} for v in report["variants"]
                      for cal, m in ((v.get("calibrated") or {}).get("tokens") or {"none": v}).items()]
        checks = [_check("max_token_ece", row, None, row["ece"], gates.max_token_ece)
                  for row in token_rows if selected(row)]
        results += checks or [_nothing_to_check("max_token_ece", gates)]
    results += _divergence_gates(gates, report, selected)
    deployed = [r for r in report.get("deployed") or [] if selected({**r, "calibrator": None})]
    if gates.max_deployed_ece_drift is not None:
        checks = [_check("max_deployed_ece_drift", r, r["format"], abs(r["ece_drift"]), gates.max_deployed_ece_drift)
                  for r in deployed]
        results += checks or [_nothing_to_check("max_deployed_ece_drift", gates)]
    if gates.min_deployed_top1_agreement is not None:
        threshold = gates.min_deployed_top1_agreement
        checks = [GateResult("min_deployed_top1_agreement", r["variant"], r["calibrator"], r["format"], r["top1"],
                             threshold, r["top1"] >= threshold - TOLERANCE, r["top1"] - threshold) for r in deployed]
        results += checks or [_nothing_to_check("min_deployed_top1_agreement", gates)]
    return results


def _divergence_gates(gates: Gates, report: dict, selected) -> list[GateResult]:
    """max_kld and min_same_top1 on each candidate variant x calibrator's divergence from the baseline."""
    rows = [{"variant": v["variant"], "calibrator": cal, **d} for v in report["variants"]
            for cal, d in (v.get("divergence") or {}).items()]
    rows = [r for r in rows if selected(r)]
    results = []
    if gates.max_kld is not None:
        checks = [_check("max_kld", r, None, r["mean_kld"], gates.max_kld) for r in rows]
        results += checks or [_nothing_to_check("max_kld", gates)]
    if gates.min_same_top1 is not None:
        threshold = gates.min_same_top1
        checks = [GateResult("min_same_top1", r["variant"], r["calibrator"], None, r["same_top1"], threshold,
                             r["same_top1"] >= threshold - TOLERANCE, r["same_top1"] - threshold) for r in rows]
        results += checks or [_nothing_to_check("min_same_top1", gates)]
    return results


def _answer_gates(gates: Gates, report: dict, selected) -> list[GateResult]:
    """max_answer_ece, min_auroc, min_coverage on report["answers"]["results"]: each candidate variant's selected
    answer calibrator (or `answer_calibrator`) on each evaluation task."""
    answers = report.get("answers") or {}
    rows = [r for r in answers.get("results", []) if selected({**r, "calibrator": None})
            and (r["calibrator"] == gates.answer_calibrator if gates.answer_calibrator else r["selected"])
            and (gates.tasks is None or r["task"] in gates.tasks)]
    target = str(gates.coverage_target or (answers.get("settings", {}).get("targets") or [None])[0])
    results = []
    for gate, value_of, at_least in (("max_answer_ece", lambda r: r["ece"], False),
                                     ("min_auroc", lambda r: r["auroc"], True),
                                     ("min_coverage", lambda r: r["coverage"].get(target, {}).get("coverage"), True)):
        threshold = getattr(gates, gate)
        if threshold is None:
            continue
        checks = []
        for r in rows:
            value = value_of(r)
            if value is None:  # AUROC of a task answered all right or all wrong: nothing to rank
                continue
            ok = value >= threshold - TOLERANCE if at_least else value <= threshold + TOLERANCE
            # a collapsed calibrator's ECE is |accuracy - 1/choices|: no calibration to pass on
            note = CONSTANT if gate == "max_answer_ece" and r.get("collapsed") else None
            ok = ok and (note is None or gates.allow_constant_answers)
            checks.append(GateResult(gate, r["variant"], r["calibrator"], r["task"], value, threshold, ok,
                                     value - threshold if at_least else threshold - value, note))
        results += checks or [GateResult(gate, gates.variant, gates.answer_calibrator, None, None, threshold, False,
                                         None)]
    return results


def gates_section(gates: Gates | None, report: dict, baseline: str = "baseline") -> dict | None:
    """report.json's `gates`: {"config", "passed", "results"}; None when the recipe sets no gates."""
    if gates is None:
        return None
    results = evaluate_gates(gates, report, baseline)
    return {"config": gates.model_dump(mode="json"), "passed": all(r.passed for r in results),
            "results": [{**asdict(r), "name": r.name} for r in results]}
