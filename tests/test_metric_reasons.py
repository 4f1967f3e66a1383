"""The error-reason label of ``clipbatch_sample_errors`` takes values from a fixed set only."""
from __future__ import annotations

import json

from clipbatch.core.results import ShardResult
from clipbatch.tasks.metrics import OTHER_REASON, REASON_CATEGORIES, UNRECORDED_REASON, WorkerMetrics, reason_category

# The reasons the readers and decoders write (workers/samples.py, readers.py, core/manifests.py),
# cut at the first ':' as the stats file keeps them.
KNOWN = {
    "shard unreadable after this point": "shard_unreadable",
    "shard corrupt": "shard_corrupt",
    "tar member lost": "member_lost",
    "duplicate key": "duplicate_key",
    "no image member (jpg/jpeg/png/webp); found ['a.txt']": "no_image",
    "no image (column 'image' is empty or missing)": "no_image",
    "no caption member (.txt)": "no_caption",
    "no caption member (.caption)": "no_caption",
    "no caption (json field 'caption' is empty or missing)": "no_caption",
    "no image member (png); found ['jpg', 'txt']": "no_image",
    "no caption (column 'caption' is empty or missing)": "no_caption",
    "caption is not valid UTF-8": "caption_invalid",
    "json member is not valid JSON": "json_invalid",
    "json member is not a JSON object": "json_invalid",
    "image (png) refused": "image_refused",
    "image (jpg) undecodable": "image_undecodable",
    "image unreadable": "image_unreadable",
    "file unreadable": "image_unreadable",
    "manifest line 12 is not valid JSON": "manifest_row_invalid",
    "manifest line 7 is not a JSON object": "manifest_row_invalid",
    "manifest line 3 has more fields than the header": "manifest_row_invalid",
    "manifest line 9 is longer than CLIPBATCH_MAX_MANIFEST_ROW_BYTES=1048576": "manifest_row_invalid",
    "column 'image' holds int, not image bytes or a path": "image_column_invalid",
    "member too large": "member_too_large",
    "sample undecodable": "sample_undecodable",
    "input refused": "input_refused",
    UNRECORDED_REASON: UNRECORDED_REASON,
}
HOSTILE = ["image (x\u202e\u0000) undecodable weird", "manifest line 99999999999 is", "manifest line x", "", ":" * 50, "z" * 5000,
           "no imagery here", "image (a:b) refused", "Traceback (most recent call last)", "column", "\n".join("ab")]


def test_every_reason_written_today_has_its_own_category():
    assert {reason: reason_category(reason) for reason in KNOWN} == KNOWN
    assert set(KNOWN.values()) | {OTHER_REASON} == set(REASON_CATEGORIES)


def test_hostile_reasons_stay_within_the_fixed_label_set():
    # given: a worker's metrics and a shard whose stats carry hostile, unbounded reasons
    metrics = WorkerMetrics()
    reasons = {reason: 1 for reason in HOSTILE} | {f"manifest line {n} is not valid JSON": 1 for n in range(300)}
    stats = json.dumps({"error_reasons": reasons}).encode()
    result = ShardResult({"stats/0.json": stats}, 0, sum(reasons.values()) + 2, 0, "")

    # when: the shard's end is reported to the metrics
    metrics._shard_finished(result, {"seconds": 1.0, "setup_s": 0.1, "compute_s": 0.8, "commit_s": 0.1})

    # then: every label is one of the fixed categories, and no failed sample is lost
    exported = {s.labels["reason"]: s.value for family in metrics.errors.collect() for s in family.samples
                if s.name.endswith("_total")}
    assert set(exported) <= set(REASON_CATEGORIES), set(exported) - set(REASON_CATEGORIES)
    assert exported["manifest_row_invalid"] == 301 and exported[UNRECORDED_REASON] == 2
    assert sum(exported.values()) == result.samples_failed
