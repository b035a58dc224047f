"""Names that come from the data (a val subset's label, a skip reason) become valid, distinct MLflow keys."""

import pytest
from mlflow.utils.validation import _validate_metric_name, _validate_param_name, _validate_tag_name

from storage.tracking import StageRun, valid_name, valid_names

# Every character class a subset label could hold.
LABELS = ["held-out (new)", "😀 emoji", "日本語", 'quotes "double" \'single\' `back`', "a/b/c", "a//b", "/lead",
          "trail/", "..", ".", "../escape", "a/../b", "./a", "...dots", "new\nline", "tab\there", "nul\x00",
          "", " ", "semi;colon,comma=eq", "percent%20", "#hash?q&x", "back\\slash", "x" * 400, "seen", "val"]


@pytest.mark.parametrize("label", LABELS)
def test_any_label_makes_a_key_mlflow_accepts(label):
    name = valid_name(f"splits.{label}.prompts")
    for validate in (_validate_metric_name, _validate_param_name, _validate_tag_name):
        validate(name)
    assert len(name) <= 250


def test_valid_names_are_kept_and_changed_names_stay_distinct():
    names = [f"splits.{s}.prompts" for s in LABELS] + ["splits.held-out _new_.prompts", "splits.a_b.x", "splits.a?b.x",
                                                          "splits.a*b.x"]
    keys = valid_names(names)
    assert len(set(keys.values())) == len(names)  # e.g. "held-out (new)" meets a real "held-out _new_"
    assert keys["splits.seen.prompts"] == "splits.seen.prompts"
    assert keys["splits.held-out _new_.prompts"] == "splits.held-out _new_.prompts"  # the valid one keeps its name
    assert keys["splits.held-out (new).prompts"].startswith("splits.held-out _new_.prompts-")
    assert valid_names(names) == keys  # the same names get the same keys in every call


class _Recorder:
    def __init__(self):
        self.metrics, self.params, self.tags = [], [], {}

    def log_batch(self, run_id, metrics=(), params=()):
        self.metrics += metrics
        self.params += params

    def set_tag(self, run_id, key, value):
        self.tags[key] = value


def test_stage_run_logs_data_names_under_valid_keys():
    run = StageRun.__new__(StageRun)
    run.run_id, run.client = "r", _Recorder()
    run.log_metrics({"splits.held-out (new).prompts": 3, "splits.😀.prompts": 1.0, "loss": 0.5}, step=2)
    run.log_params({"store.storage_options.key with ünïcode/..": "x"})
    run.set_tags({"source (hf)": "y"})
    for m in run.client.metrics:
        _validate_metric_name(m.key)
    assert {m.key for m in run.client.metrics} >= {"splits.held-out _new_.prompts", "loss"}
    _validate_param_name(run.client.params[0].key)
    assert list(run.client.tags) == ["source _hf_"]
