"""``calm-fast merge --method calm`` (data config, adapters, data files, dry run, errors, atomic output) and
``--method doge_ta``: the CLI's results equal the Python API's bit for bit.

Small models built in code (tests/calm_cli_models.py: a generic adapter through a module:function entry
point; a tiny BERT and a tiny open_clip CLIP written to tmp folders); nothing is downloaded.
"""
import importlib.util
import json
import os

import pytest
import torch
import yaml

import calm_cli_models as cm
import calm_fast
from calm_fast import cli, cli_methods
from calm_fast.data_config import CalmParameters, schema_from_signature
from calm_fast.io import load_state_dict, save_state_dict

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
needs_open_clip = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip not installed")

PARAMS = {"iterations": 3, "batch_size": 16, "sparsity": 0.05, "eval_every": 2}


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def tree(root):
    """Every path under root with its size and mtime (to show that nothing was touched)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def problem(tmp_path):
    paths = cm.write_problem(tmp_path)

    def config(name="calm.yaml", params=None, tasks=None, **top):
        cfg = {"merge_method": "calm", "base_model": "base.safetensors", "adapter": "calm_cli_models:build",
               "tasks": {t: {"model": f"ft_{t}.safetensors", "data": f"data_{t}.pt", "eval": {"data": f"eval_{t}.pt"}}
                         for t in cm.TASKS},
               "parameters": {**PARAMS, **(params or {})}, "output": "out"}
        for t, upd in (tasks or {}).items():
            if upd is None:
                cfg["tasks"][t].pop("data")
            else:
                cfg["tasks"][t].update(upd)
        cfg.update(top)
        cfg = {k: v for k, v in cfg.items() if not (k == "base_model" and v is None)}
        (tmp_path / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
        return tmp_path / name

    return tmp_path, paths, config


def api_calm(root, **params):
    models = {t: str(root / f"ft_{t}.safetensors") for t in cm.TASKS}
    loaded = cm.build(str(root / "base.safetensors"), models, cm.TASKS)
    data = {t: torch.load(root / f"data_{t}.pt") for t in cm.TASKS}
    evals = {}
    for t in cm.TASKS:
        e = torch.load(root / f"eval_{t}.pt")
        evals[t] = (e["x"], e["labels"])
    return calm_fast.calm(loaded.pretrained, dict(zip(cm.TASKS, loaded.finetuned)), loaded.adapter, data,
                          eval_data=evals, progress=False, **{**PARAMS, **params})


def assert_bits(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# ------------------------------------------------------------------------------------------------
# results equal the Python API
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("faithful", [False, True])
def test_calm_cli_equals_python_api(problem, capsys, faithful):
    root, paths, config = problem
    cfg = config(params={"faithful": faithful, "schedule": [["c"], ["a"], ["b"]]}, seed=0)
    rc, out, err = run(["merge", "--config", cfg, "--seed", 7, "--json", root / "r.json"], capsys)  # --seed wins
    assert rc == 0, err
    res = api_calm(root, seed=7, faithful=faithful, schedule=[["c"], ["a"], ["b"]])
    got = load_state_dict(root / "out" / "model.safetensors")
    assert_bits(got, res.state_dict)  # the base holds exactly the merged encoder tensors here
    masks = load_state_dict(root / "out" / "calm_masks.safetensors")
    for i, m in enumerate(res.masks):
        assert torch.equal(masks[f"mask.step{i}.{m['task']}"], m["packed"])
    for t, c in res.credible.items():
        assert torch.equal(masks[f"credible.{t}.ids"], c.ids) and torch.equal(masks[f"credible.{t}.labels"], c.labels)
    record = json.loads((root / "out" / "calm_record.json").read_text())
    assert record["config"]["seed"] == 7 and record["config"]["schedule"] == [["c"], ["a"], ["b"]]
    assert record["config"]["faithful"] is faithful
    report = json.loads((root / "r.json").read_text())
    assert report["method"] == "calm" and report["params"]["seed"] == 7 and report["merged_parameters"] == sum(
        v.numel() for v in res.state_dict.values())
    assert "final accuracy" in out
    # a different seed gives different batches: the comparison above is not vacuous
    other = api_calm(root, seed=8, faithful=faithful, schedule=[["c"], ["a"], ["b"]])
    assert any(not torch.equal(other.state_dict[k], res.state_dict[k]) for k in res.state_dict) or any(
        not torch.equal(a["packed"], b["packed"]) for a, b in zip(other.masks, res.masks))


def test_calm_cli_adapter_only_entry_point_and_data_entry_point(problem, capsys):
    """An adapter entry point returning only the adapter (tensors read from the checkpoints, any format: one
    task as .pt) and a data entry point; the output is the base checkpoint with the merged tensors."""
    root, paths, config = problem
    sd = load_state_dict(root / "ft_b.safetensors")
    torch.save(sd, root / "ft_b.pt")
    cfg = config(adapter="calm_cli_models:adapter_only",
                 tasks={"b": {"model": "ft_b.pt", "data": {"entry": "calm_cli_models:unlabeled",
                                                           "options": {"n": 25}}},
                        "c": {"data": "calm_cli_models:unlabeled"}})
    rc, out, err = run(["merge", "-c", cfg, "-q"], capsys)
    assert rc == 0, err
    loaded = cm.build(paths["base"], {t: paths[t] for t in cm.TASKS}, cm.TASKS)
    data = {"a": torch.load(root / "data_a.pt"), "b": cm.unlabeled("b", n=25), "c": cm.unlabeled("c")}
    evals = {t: tuple(torch.load(root / f"eval_{t}.pt").values()) for t in cm.TASKS}
    res = calm_fast.calm(loaded.pretrained, dict(zip(cm.TASKS, loaded.finetuned)), loaded.adapter, data,
                         eval_data=evals, progress=False, **PARAMS)
    assert_bits(load_state_dict(root / "out" / "model.safetensors"), res.state_dict)


def test_calm_cli_teacher_logits(problem, capsys):
    """Precomputed teacher logits per task (.safetensors / .pt) replace the fine-tuned teacher, as in the API."""
    from safetensors.torch import save_file

    root, paths, config = problem
    g = torch.Generator().manual_seed(5)
    teacher = {t: torch.randn(40, cm.CLASSES[t], generator=g) * 4 for t in cm.TASKS}
    save_file({"logits": teacher["a"]}, str(root / "z_a.safetensors"))
    for t in ("b", "c"):
        torch.save(teacher[t], root / f"z_{t}.pt")
    cfg = config(tasks={"a": {"teacher_logits": "z_a.safetensors"}, "b": {"teacher_logits": "z_b.pt"},
                        "c": {"teacher_logits": "z_c.pt"}})
    rc, out, err = run(["merge", "-c", cfg, "-q"], capsys)
    assert rc == 0, err
    loaded = cm.build(paths["base"], {t: paths[t] for t in cm.TASKS}, cm.TASKS)
    data = {t: torch.load(root / f"data_{t}.pt") for t in cm.TASKS}
    evals = {t: tuple(torch.load(root / f"eval_{t}.pt").values()) for t in cm.TASKS}
    res = calm_fast.calm(loaded.pretrained, dict(zip(cm.TASKS, loaded.finetuned)), loaded.adapter, data,
                         teacher_logits=teacher, eval_data=evals, progress=False, **PARAMS)
    assert_bits(load_state_dict(root / "out" / "model.safetensors"), res.state_dict)
    assert json.loads((root / "out" / "calm_record.json").read_text())["config"]["teacher"] == "teacher_logits"
    # for some tasks only, or of the wrong size: clear errors, no output
    for tasks, msg in [({"a": {"teacher_logits": "z_a.safetensors"}}, "teacher_logits given for ['a'] but not"),
                       ({t: {"teacher_logits": "z_b.pt"} for t in cm.TASKS},
                        "teacher logits have 4 classes but the head has 3")]:
        cfg = config(name="bad.yaml", tasks=tasks, output="out2")
        rc, out, err = run(["merge", "-c", cfg], capsys)
        assert rc == 2 and msg in err, err
        assert not (root / "out2").exists()


def test_registering_a_data_method_is_one_table_entry(problem, capsys, monkeypatch):
    """A method added as one DataMethod entry (schema derived from the function's signature, a keyword implied
    by its name) runs from the same data config."""
    root, paths, config = problem
    monkeypatch.setitem(cli_methods.DATA_METHODS, "calm_mean",
                        cli_methods.DataMethod("calm_fast.methods.calm:calm", fixed={"batch_reduction": "mean"}))
    cfg = config(merge_method="calm_mean")
    rc, out, err = run(["merge", "-c", cfg, "-q"], capsys)
    assert rc == 0, err
    res = api_calm(root, batch_reduction="mean")
    assert_bits(load_state_dict(root / "out" / "model.safetensors"), res.state_dict)
    assert (root / "out" / "calm_mean_record.json").is_file()
    rc, out, err = run(["merge", "-c", cfg, "--set", "batch_reduction=sum", "-o", root / "o2"], capsys)
    assert rc == 2 and "implies batch_reduction='mean'" in err and not (root / "o2").exists()


def test_calm_parameters_cover_every_keyword_of_calm():
    derived = schema_from_signature(calm_fast.calm, skip=cli_methods.DATA_KEYWORDS)
    assert set(CalmParameters.model_fields) == set(derived.model_fields)


def test_schema_from_signature_types():
    from typing import Optional, Sequence, Tuple, Union

    from calm_fast.data_config import validate_parameters
    from calm_fast.io.errors import ConfigError

    def method(pretrained, finetuned, adapter, unlabeled_inputs, *, steps: Optional[int] = None, lr: float = 1e-3,
               betas: Optional[Tuple[float, float]] = None, eps: Union[None, float, str] = "preset",
               include: Union[None, str, Sequence[str]] = None, clamp: bool = True, callback=None):
        pass

    schema = schema_from_signature(method)
    assert set(schema.model_fields) == {"steps", "lr", "betas", "eps", "include", "clamp"}
    ok = validate_parameters(schema, {"steps": 3, "lr": 1, "betas": [0.9, 0.99], "eps": "preset",
                                      "include": ["a", "b"], "clamp": False}, "p.")
    assert ok == {"steps": 3, "lr": 1.0, "betas": (0.9, 0.99), "eps": "preset", "include": ["a", "b"], "clamp": False}
    for bad in ({"steps": 1.5}, {"lr": "0.1"}, {"lr": float("inf")}, {"clamp": "no"}, {"betas": [1]},
                {"callback": "x"}):
        with pytest.raises(ConfigError):
            validate_parameters(schema, bad, "p.")


# ------------------------------------------------------------------------------------------------
# dry run
# ------------------------------------------------------------------------------------------------
def test_calm_dry_run_touches_nothing(problem, capsys):
    root, paths, config = problem
    cfg = config()
    before = tree(root)
    rc, out, err = run(["merge", "-c", cfg, "--dry-run"], capsys)
    assert rc == 0, err
    assert tree(root) == before
    for text in ("tasks (3):", "a: model", "head 4 classes", "unlabeled 40", "merged tensors: 4 (248 parameters)",
                 "schedule:", "mask optimisation of 'c'", "iterations=3", "memory estimate:", "nothing was written"):
        assert text in out, text


# ------------------------------------------------------------------------------------------------
# errors: exit codes, clear messages, no output
# ------------------------------------------------------------------------------------------------
def _labels_file(root):
    torch.save({"x": torch.randn(4, cm.DIM_IN), "labels": torch.tensor([0, 1, 7, 2])}, root / "bad_eval.pt")
    return {"a": {"eval": {"data": "bad_eval.pt"}}}


ERRORS = [
    ("missing data", dict(tasks={"b": None}), 2, "no unlabeled data for task(s) ['b']"),
    ("class count", dict(tasks={"a": {"num_classes": 5}}), 2, "the head has 3 classes but the config says"),
    ("labels outside the head", "labels", 2, "but the head has 3 classes"),
    ("unknown task in schedule", dict(params={"schedule": [["a", "b"], ["zz"]]}), 2, "unknown task 'zz'"),
    ("ratio too small", dict(params={"ratio": 0.01}), 2, "the credible set would be empty"),
    ("missing model", dict(tasks={"a": {"model": "nope.safetensors"}}), 3, "nope.safetensors does not exist"),
    ("missing data file", dict(tasks={"a": {"data": "nope.pt"}}), 3, "nope.pt does not exist"),
    ("missing base", dict(base_model="nobase"), 3, "base_model:"),
    ("unknown data format", "csv", 2, "unknown data format"),
    ("text for an image model", "txt", 2, "a text file needs a text model"),
    ("missing entry module", dict(adapter="no_such_module:build"), 2, "cannot import module 'no_such_module'"),
    ("entry point raises", dict(tasks={"a": {"data": "calm_cli_models:broken"}}), 2, "the data server is down"),
    ("unknown parameter", dict(params={"iteration": 3}), 2, "did you mean 'iterations'"),
    ("quoted number", dict(params={"eta": "0.5"}), 2, "parameters.eta"),
    ("adapter keys", dict(adapter={"type": "calm_cli_models:build", "templates": ["{}"]}), 2, "do not apply"),
    ("wrong input shape", "shape", 2, "the network cannot run on its data"),
    ("eval without labels", dict(tasks={"a": {"eval": {"data": "data_a.pt"}}}), 2, "no labels"),
    ("mergekit models key", dict(models=["ft_a.safetensors"]), 2, "per task"),
    ("no adapter", dict(adapter=None), 2, "no 'adapter'"),
    ("no base for hf-encoder", dict(adapter="hf-encoder", base_model=None), 2, "no base model"),
    ("bad device", dict(device="gpu0"), 2, "not a device name"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_calm_errors_are_clear_and_leave_no_output(problem, capsys, case):
    root, paths, config = problem
    _, change, code, message = case
    if change == "labels":
        change = dict(tasks=_labels_file(root))
    elif change == "csv":
        (root / "data.csv").write_text("1,2\n")
        change = dict(tasks={"a": {"data": "data.csv"}})
    elif change == "txt":
        (root / "data.txt").write_text("hello\nworld\n")
        change = dict(tasks={"a": {"data": "data.txt"}})
    elif change == "shape":
        torch.save(torch.randn(10, 5), root / "bad.pt")
        change = dict(tasks={"c": {"data": "bad.pt"}})
    cfg = config(**change)
    before = tree(root)
    rc, out, err = run(["merge", "-c", cfg], capsys)
    assert rc == code, err
    assert message in err, err
    assert tree(root) == before  # no output, no staging folder, no lock file


def test_calm_errors_of_flags_and_output(problem, capsys):
    root, paths, config = problem
    cfg = config()
    rc, _, err = run(["merge", "-c", cfg, "--model", paths["a"]], capsys)
    assert rc == 2 and "--model" in err and "tasks:" in err
    rc, _, err = run(["merge", "-c", cfg, "--scaling", "0.3"], capsys)
    assert rc == 2 and "--scaling" in err
    (root / "out").mkdir()
    (root / "out" / "model.safetensors").write_bytes(b"x")
    rc, _, err = run(["merge", "-c", cfg], capsys)
    assert rc == 6 and "already exists" in err
    assert sorted(os.listdir(root / "out")) == ["model.safetensors"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_device_without_gpu_is_a_clear_error(problem, capsys):
    root, paths, config = problem
    rc, _, err = run(["merge", "-c", config(), "--device", "cuda"], capsys)
    assert rc == 2 and "no CUDA GPU is visible" in err and not (root / "out").exists()


def test_failed_calm_runs_leave_no_output(problem, capsys, monkeypatch):
    root, paths, config = problem
    # an empty credible set found only by the run (enough samples, but no class large enough)
    params = {"ratio": 0.05}
    with pytest.raises(ValueError, match="credible set is empty"):
        api_calm(root, **params)
    cfg = config(params=params)
    before = tree(root)
    rc, _, err = run(["merge", "-c", cfg], capsys)
    assert rc == 2 and "credible set is empty" in err
    assert tree(root) == before
    # a failure while the output is being written: nothing published, the staging folder removed
    cfg = config(name="ok.yaml")
    before = tree(root)

    def fail(result, out):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(cli_methods.DATA_METHODS, "calm",
                        cli_methods.DataMethod(**{**cli_methods.DATA_METHODS["calm"].__dict__, "extra_files": fail}))
    rc, _, err = run(["merge", "-c", cfg, "--json", root / "r.json"], capsys)
    assert rc != 0 and "No space left" in err
    assert tree(root) == before


# ------------------------------------------------------------------------------------------------
# Hugging Face encoder with text data; open_clip with zero-shot heads
# ------------------------------------------------------------------------------------------------
BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=24, initializer_range=0.3)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "the a cat dog sat on mat good bad movie".split()


@needs_hf
def test_calm_cli_hf_encoder_text_data(tmp_path, capsys):
    from transformers import AutoModel, BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    from calm_fast.models import load_hf_encoder

    torch.manual_seed(3)
    g = torch.Generator().manual_seed(4)
    base = BertModel(BertConfig(**BERT)).eval()
    base.save_pretrained(tmp_path / "base")
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(tmp_path / "base")
    words = VOCAB[5:]
    tasks = {"sst2": 2, "mnli": 3}
    for t, labels in tasks.items():
        m = BertForSequenceClassification(BertConfig(**BERT, num_labels=labels))
        m.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.bert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.save_pretrained(tmp_path / t)
        lengths = torch.randint(2, 7, (30,), generator=g)
        lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g)) for n in lengths]
        (tmp_path / f"{t}.txt").write_text("\n".join(lines) + "\n\n")  # a trailing blank line is skipped
        (tmp_path / f"{t}_test.txt").write_text("\n".join(lines[:10]))
        (tmp_path / f"{t}_labels.txt").write_text("\n".join(str(i % labels) for i in range(10)))
    params = {"iterations": 2, "batch_size": 8, "sparsity": 0.05, "ratio": 0.8, "eval_every": 1}
    cfg = {"merge_method": "calm", "base_model": "base", "adapter": {"type": "hf-encoder", "max_length": 12},
           "tasks": {t: {"model": t, "data": f"{t}.txt", "num_classes": tasks[t],
                         "eval": {"data": f"{t}_test.txt", "labels": f"{t}_labels.txt"}} for t in tasks},
           "parameters": params, "output": "merged"}
    (tmp_path / "calm.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc, out, err = run(["merge", "-c", tmp_path / "calm.yaml", "-q"], capsys)
    assert rc == 0, err

    loaded = load_hf_encoder(tmp_path / "base", {t: tmp_path / t for t in tasks})
    ad = loaded.adapter
    read = lambda p: [x for x in p.read_text().splitlines() if x.strip()]  # noqa: E731
    data = {t: ad.tokenize(read(tmp_path / f"{t}.txt"), max_length=12) for t in tasks}
    evals = {t: (ad.tokenize(read(tmp_path / f"{t}_test.txt"), max_length=12),
                 torch.tensor([i % tasks[t] for i in range(10)])) for t in tasks}
    res = calm_fast.calm(loaded.pretrained, dict(zip(tasks, loaded.finetuned)), ad, data, eval_data=evals,
                         progress=False, **params)
    merged = AutoModel.from_pretrained(tmp_path / "merged", local_files_only=True)  # loads as users load it
    own = merged.state_dict()
    for k, v in res.state_dict.items():
        assert torch.equal(own[k], v), k
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    # the head class count checked against the config
    cfg["tasks"]["mnli"]["num_classes"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**cfg, "output": "merged2"}, sort_keys=False))
    rc, out, err = run(["merge", "-c", tmp_path / "bad.yaml"], capsys)
    assert rc == 2 and "'mnli': the head has 3 classes" in err and not (tmp_path / "merged2").exists()


CLIP_CFG = dict(embed_dim=12, vision_cfg=dict(layers=1, width=16, head_width=8, patch_size=4, image_size=8),
                text_cfg=dict(context_length=12, width=16, heads=2, layers=1))


@needs_open_clip
def test_calm_cli_open_clip_zeroshot(tmp_path, capsys):
    import open_clip
    from safetensors.torch import save_file

    from calm_fast.models import open_clip_from_state_dicts, zeroshot_head

    torch.manual_seed(5)
    g = torch.Generator().manual_seed(6)
    model = open_clip.CLIP(**CLIP_CFG)
    base_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(base_sd, str(tmp_path / "clip.safetensors"))
    classes = {"cars": ["sedan", "truck", "van"], "pets": ["cat", "dog"]}
    for t in classes:
        ft = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base_sd.items() if k.startswith("visual.")}
        torch.save({"model." + k: v for k, v in ft.items()}, tmp_path / f"{t}.pt")  # ImageEncoder-style keys
        save_file({"images": torch.randn(24, 3, 8, 8, generator=g)}, str(tmp_path / f"{t}_images.safetensors"))
    params = {"iterations": 2, "batch_size": 8, "sparsity": 0.05}
    cfg = {"merge_method": "calm", "base_model": "clip.safetensors",
           "adapter": {"type": "open-clip", "model_config": CLIP_CFG, "templates": ["a photo of a {}."]},
           "tasks": {t: {"model": f"{t}.pt", "data": f"{t}_images.safetensors", "classnames": c}
                     for t, c in classes.items()},
           "parameters": params, "output": "merged"}
    (tmp_path / "calm.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rc, out, err = run(["merge", "-c", tmp_path / "calm.yaml", "-q"], capsys)
    assert rc == 0, err

    ref = open_clip.CLIP(**CLIP_CFG)
    ref.load_state_dict(base_sd)
    ref.eval()
    heads = {t: zeroshot_head(ref, c, ["a photo of a {}."]) for t, c in classes.items()}
    loaded = open_clip_from_state_dicts(ref, {t: tmp_path / f"{t}.pt" for t in classes}, heads)
    data = {t: load_state_dict(tmp_path / f"{t}_images.safetensors")["images"] for t in classes}
    res = calm_fast.calm(loaded.pretrained, dict(zip(classes, loaded.finetuned)), loaded.adapter, data,
                         progress=False, **params)
    got = load_state_dict(tmp_path / "merged" / "model.safetensors")
    assert set(got) == set(base_sd)  # the whole CLIP model, as it was given
    for k, v in got.items():
        assert torch.equal(v, res.state_dict[k] if k in res.state_dict else base_sd[k]), k
    assert any(not torch.equal(got[k], base_sd[k]) for k in res.state_dict)


# ------------------------------------------------------------------------------------------------
# DOGE_TA
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def doge_models(tmp_path):
    g = torch.Generator().manual_seed(11)
    base = {"encoder.q.weight": torch.randn(12, 8, generator=g), "encoder.fc.weight": torch.randn(6, 12, generator=g),
            "encoder.fc.bias": torch.randn(6, generator=g), "encoder.layer_norm.weight": torch.ones(8),
            "head.weight": torch.randn(3, 6, generator=g), "ids": torch.arange(4)}
    save_state_dict(base, tmp_path / "base")
    fts = []
    for i in range(3):
        ft = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
        fts.append(ft)
        if i == 1:
            torch.save(ft, tmp_path / "ft1.pt")  # any format the merger reads
        else:
            save_state_dict(ft, tmp_path / f"ft{i}.safetensors")
    return tmp_path, base, fts, [tmp_path / "ft0.safetensors", tmp_path / "ft1.pt", tmp_path / "ft2.safetensors"]


def test_doge_ta_cli_equals_python_api(doge_models, capsys):
    root, base, fts, paths = doge_models
    cfg = {"merge_method": "doge_ta", "base_model": "base", "models": [str(p.name) for p in paths],
           "parameters": {"eta": 0.15, "steps": 7, "subspace": 3, "density": 0.5, "lr": 1e-3}, "output": "out"}
    (root / "doge.yaml").write_text(yaml.safe_dump(cfg))
    before = tree(root)
    rc, out, err = run(["merge", "-c", root / "doge.yaml", "--dry-run"], capsys)
    assert rc == 0, err
    assert tree(root) == before and "merged tensors: 2" in out and "memory estimate" in out
    rc, out, err = run(["merge", "-c", root / "doge.yaml", "--density", "0.4", "--json", root / "r.json"], capsys)
    assert rc == 0, err
    want = calm_fast.doge_ta(base, fts, eta=0.15, steps=7, subspace=3, density=0.4, lr=1e-3).merged
    assert_bits(load_state_dict(root / "out"), want)
    rec = json.loads((root / "out" / "doge_ta_record.json").read_text())
    assert rec["keys"] == ["encoder.fc.weight", "encoder.q.weight"] and rec["params"]["density"] == 0.4
    assert json.loads((root / "r.json").read_text())["merged_parameters"] == 12 * 8 + 6 * 12
    # flags: include/exclude and --set, a single-file output
    rc, out, err = run(["merge", "-c", root / "doge.yaml", "--exclude", "fc", "--set", "subspace_solver=gram",
                        "-o", root / "one.safetensors"], capsys)
    assert rc == 0, err
    want = calm_fast.doge_ta(base, fts, eta=0.15, steps=7, subspace=3, density=0.5, lr=1e-3, exclude=["fc"],
                             subspace_solver="gram").merged
    assert_bits(load_state_dict(root / "one.safetensors"), want)


def test_doge_ta_cli_errors(doge_models, capsys):
    root, base, fts, paths = doge_models
    argv = ["merge", "--method", "doge_ta", "--base", root / "base"] + sum((["--model", p] for p in paths), [])
    cases = [(["--include", "bias"], 2, "2-D weight matrices only"),
             (["--set", "steps=-1"], 2, "greater than or equal to 0"),
             (["--set", "eta=.nan"], 2, "finite"),
             (["--density", "0"], 2, "density"),
             (["--set", "subspace_solver=qr"], 2, "subspace_solver"),
             (["--seed", "1"], 2, "--seed"),
             (["--model", root / "missing.pt"], 3, "missing.pt")]
    for extra, code, msg in cases:
        before = tree(root)
        rc, out, err = run(argv + extra + ["-o", root / "out"], capsys)
        assert rc == code and msg in err, (extra, err)
        assert tree(root) == before
    # a layer whose task vector is zero: lambda = eta / 0 is undefined
    torch.save({**fts[1], "encoder.q.weight": base["encoder.q.weight"].clone()}, root / "zero.pt")
    rc, out, err = run(argv[:-6] + ["--model", root / "zero.pt", "--model", paths[0], "-o", root / "out"], capsys)
    assert rc == 2 and "exactly zero" in err and not (root / "out").exists()


def test_readme_examples_validate():
    """The calm / doge_ta YAML examples of the README pass their schemas (and the parameters theirs)."""
    import re
    from pathlib import Path

    from calm_fast.config import parse_yaml
    from calm_fast.data_config import (DataMergeConfig, DogeMergeConfig, DogeParameters, validate,
                                       validate_parameters)

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    seen = set()
    for b in re.findall(r"```yaml\n(.*?)```", readme, re.S):
        data = parse_yaml(b)
        method = data.get("merge_method")
        if method == "calm":
            cfg = validate(DataMergeConfig, data, "README")
            validate_parameters(CalmParameters, cfg.parameters, "parameters.")
            assert cfg.adapter.type in ("hf-encoder", "open-clip") and cfg.tasks
            seen.add(cfg.adapter.type)
        elif method == "doge_ta":
            cfg = validate(DogeMergeConfig, data, "README")
            validate_parameters(DogeParameters, cfg.parameters, "parameters.")
            seen.add("doge_ta")
    assert seen == {"hf-encoder", "open-clip", "doge_ta"}


# ------------------------------------------------------------------------------------------------
# the AdaMerging family through the same data config
# ------------------------------------------------------------------------------------------------
ADA = {"steps": 4, "batch_size": 8}


@pytest.mark.parametrize("method,fixed,params", [
    ("adamerging", {"mode": "adamerging"}, {**ADA, "granularity": "layer"}),
    ("adamerging_pp", {"mode": "adamerging_pp"}, {**ADA, "preset": "fusion_bench"}),
    ("doge_adamerging", {}, {**ADA, "doge_steps": 3, "include": [r"\.weight$"]}),
])
def test_adamerging_family_cli_equals_python_api(problem, capsys, method, fixed, params):
    root, paths, config = problem
    cfg = config(merge_method=method, params=params)
    cfg_text = yaml.safe_load(cfg.read_text())
    cfg_text["parameters"] = dict(params)  # not CALM's settings
    cfg.write_text(yaml.safe_dump(cfg_text, sort_keys=False))
    rc, out, err = run(["merge", "--config", cfg, "--seed", 3], capsys)
    assert rc == 0, err
    loaded = cm.build(paths["base"], {t: paths[t] for t in cm.TASKS}, cm.TASKS)
    data = {t: torch.load(root / f"data_{t}.pt") for t in cm.TASKS}
    fn = calm_fast.doge_adamerging if method == "doge_adamerging" else calm_fast.adamerging
    res = fn(loaded.pretrained, dict(zip(cm.TASKS, loaded.finetuned)), loaded.adapter, data, progress=False,
             seed=3, **fixed, **params)
    assert_bits(load_state_dict(root / "out" / "model.safetensors"), res.state_dict)
    # the coefficients moved away from their initial value: the comparison is not of two untrained merges
    other = fn(loaded.pretrained, dict(zip(cm.TASKS, loaded.finetuned)), loaded.adapter, data, progress=False,
               seed=3, **fixed, **{**params, "steps": 0 if method != "doge_adamerging" else 1})
    assert any(not torch.equal(other.state_dict[k], res.state_dict[k]) for k in res.state_dict)
