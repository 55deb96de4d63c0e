"""`python -m conan_st.evaluation`: the table and mteb's own result files agree."""

from __future__ import annotations

import json

from mteb.results import TaskResult

from conan_st.evaluation import main
from tests.conan.helpers import minilm_path


def test_cli_writes_table_and_mteb_result_files(tmp_path, data_dir):
    # a small STS task of real rows (the first 40 of STS-B en test) keeps the run short
    sts = tmp_path / "data/text/pairs/en/stsb-en-test.tsv"
    sts.parent.mkdir(parents=True)
    rows = (data_dir / "text/pairs/en/stsb-en-test.tsv").read_text(encoding="utf-8").splitlines()[:40]
    sts.write_text("\n".join(rows) + "\n", encoding="utf-8")

    out = tmp_path / "eval"
    main([minilm_path(), "--tasks", "STSBenLocal", "--data-dir", str(tmp_path / "data"), "--out", str(out)])

    table = json.loads(out.with_suffix(".json").read_text())
    (score,) = table[minilm_path()].values()
    assert 0.3 < score <= 1.0  # MiniLM on STS-B: a clearly positive Spearman
    assert "STSBenLocal" in out.with_suffix(".md").read_text()
    files = list((tmp_path / "eval_mteb").rglob("STSBenLocal.json"))
    assert len(files) == 1, list((tmp_path / "eval_mteb").rglob("*"))
    result = TaskResult.from_disk(files[0])
    assert files[0].parts[-3] == "local__model"  # under the model's folder name, not "no_model_name"
    assert result.task_name == "STSBenLocal" and abs(result.get_score() - score) < 1e-4  # mteb rounds
