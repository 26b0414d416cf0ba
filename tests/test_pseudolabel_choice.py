"""Which MAESTRO segments get pseudo-labels: a seeded subset of the segment ids (no Ray started)."""

from __future__ import annotations

import random

from pipelines.pseudolabel import sample_ids

IDS = [f"maestro/2004/perf-{p:02d}#{s:03d}" for p in range(6) for s in range(40)]


def test_the_subset_is_seeded_sorted_and_of_the_asked_size():
    chosen = sample_ids(IDS, 25, seed=3)
    assert len(chosen) == len(set(chosen)) == 25 and set(chosen) <= set(IDS)
    assert chosen == sorted(chosen)
    assert sample_ids(IDS, 25, seed=3) == chosen  # a rerun picks the same segments (the stage then skips)
    assert sample_ids(IDS, 25, seed=4) != chosen
    assert all(isinstance(i, str) for i in chosen)  # plain str, as the Ray Data filter and the manifest expect


def test_the_subset_does_not_depend_on_the_order_the_ids_were_read_in():
    shuffled = IDS[:]
    random.Random(0).shuffle(shuffled)
    assert sample_ids(shuffled, 25, seed=3) == sample_ids(IDS, 25, seed=3)


def test_asking_for_as_many_or_more_than_there_are_takes_all():
    assert sample_ids(reversed(IDS), len(IDS), seed=0) == sorted(IDS)
    assert sample_ids(IDS[:5], 100, seed=0) == sorted(IDS[:5])


def test_raw_labels_on_a_folder_without_their_column_are_refused_before_any_run(tmp_path):
    import json

    import pytest

    from mdlda.config import StudentConfig
    from mdlda.params import audio_params
    from pipelines.student_stage import check_pseudo_columns

    old = {"dataset": "maestro-pseudo", "audio": audio_params(), "options": {"teachers": [], "teacher_spread": {}}}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    check_pseudo_columns(StudentConfig(), tmp_path)  # calibrated labels: the column is not needed
    with pytest.raises(ValueError, match="no 'labels_raw' column .* run `mdlda pseudolabel`"):
        check_pseudo_columns(StudentConfig(labels="raw"), tmp_path)
    new = {**old, "options": {**old["options"], "labels_raw": "the teachers' mean before their calibration"}}
    (tmp_path / "manifest.json").write_text(json.dumps(new))
    check_pseudo_columns(StudentConfig(labels="raw"), tmp_path)
