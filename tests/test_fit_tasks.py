"""Many fit tasks: MMLU's 57 subjects as calq tasks (one YAML each, and the group `mmlu_subjects`), read offline;
fit and evaluation tasks never share questions, even when their names differ."""

import pytest

from calq.errors import CalqError
from calq.evaluation import answer_calibration, harness
from calq.evaluation.tasks import available, data_source, listing, shared_data
from tests.conftest import data_dir


def subjects() -> list[str]:
    return [name for name in available() if name.startswith("mmlu_") and name not in ("mmlu_5shot", "mmlu_subjects")]


def test_every_mmlu_subject_is_a_task_reading_its_own_part_of_mmlu():
    assert len(subjects()) == 57
    assert data_source("mmlu_anatomy") == ("mmlu", "anatomy") and data_source("mmlu") == ("mmlu", None)
    assert data_source("not_a_calq_task") is None
    # messages that list calq's tasks name the group once, not its 57 tasks
    assert "mmlu_subjects (57 tasks mmlu_*)" in listing() and "mmlu_anatomy" not in listing()


@pytest.mark.skipif(data_dir() is None, reason="needs CALQ_DATA_DIR (the shared offline data)")
def test_the_mmlu_subjects_group_loads_offline_as_57_multiple_choice_tasks_by_calq_names():
    docs = harness.check_tasks(["mmlu_subjects", "copa"], data_dir(), 3, multiple_choice=True)
    assert list(docs) == [*subjects(), "copa"] and {d["n"] for d in docs.values()} == {3}
    # the same task listed by name reads the same questions as through the group
    assert harness.check_tasks(["mmlu_anatomy"], data_dir(), 3)["mmlu_anatomy"] == docs["mmlu_anatomy"]


@pytest.mark.parametrize("fit, evaluation, shared", [
    (["mmlu_anatomy", "copa"], ["mmlu"], "mmlu (anatomy)"),
    (["mmlu_5shot"], ["arc_easy", "mmlu"], "mmlu"),
    (["truthfulqa_mc2"], ["truthfulqa_mc1"], "truthfulqa/mc_task.json"),
])
def test_fit_and_evaluation_tasks_that_read_the_same_questions_are_a_recipe_error(fit, evaluation, shared):
    with pytest.raises(CalqError, match="read the same questions") as err:
        answer_calibration.check_split(fit, evaluation)
    assert shared in err.value.what


def test_tasks_on_different_questions_may_fit_and_evaluate():
    answer_calibration.check_split([*subjects(), "arc_challenge", "truthfulqa_mc1", "siqa"], ["arc_easy", "boolq"])
    assert shared_data("mmlu_anatomy", "mmlu_astronomy") is None and shared_data("arc_easy", "arc_challenge") is None
