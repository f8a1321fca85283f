"""Model adapters (calm_fast.models): functional forwards equal the modules' own, gradients land in the
FlatParams buffer, heads stay frozen, zero-shot heads equal a direct computation, evaluation helpers.

Every model is built in code (tiny configs); nothing is downloaded.
"""
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calm_fast.io.errors import CheckpointError, MismatchError
from calm_fast.models import (FlatParams, GenericAdapter, LoadedModels, accuracies, accuracy, evaluate,
                              predict_logits)

from conftest import assert_same


def _grads_vs_plain(adapter, names, values, task, inputs, plain_module, plain_prefix, loss_fn):
    """Backward through the adapter on a FlatParams holding ``values``, and through ``plain_module`` (a
    copy whose merged parameters hold the same values); the flat buffer must hold autograd's gradients."""
    fp = FlatParams.from_tensors(values, names)
    data_ptr, grad_ptr = fp.data.data_ptr(), fp.grad.data_ptr()
    loss_fn(adapter.logits(fp.as_dict(), task, inputs)).backward()
    assert fp.data.data_ptr() == data_ptr and fp.grad.data_ptr() == grad_ptr
    fp.check_grads_attached()
    plain_module.zero_grad(set_to_none=True)
    loss_fn(plain_module(inputs) if isinstance(inputs, torch.Tensor) else plain_module(**inputs)).backward()
    own = dict(plain_module.named_parameters())
    for name, g in zip(fp.names, fp.grads):
        want = own[plain_prefix + name].grad
        want = torch.zeros_like(g) if want is None else want
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
        assert g.data_ptr() == fp.grad.data_ptr() + fp.offsets[fp.names.index(name)] * 4
    assert fp.grad.abs().sum() > 0
    return fp


def _loss(logits):
    # a loss whose gradient is not uniform over the logits
    logits = getattr(logits, "logits", logits)  # a transformers output object
    return (logits.log_softmax(-1) * torch.linspace(0.5, 1.5, logits.shape[-1])).sum()


# ------------------------------------------------------------------------------------------------
# generic adapter
# ------------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, 5)

    def forward(self, x, scale=None):
        h = self.l2(torch.tanh(self.l1(x)))
        return h * scale if scale is not None else h


def test_generic_forward_grads_and_frozen_heads(gen):
    torch.manual_seed(1)
    net = Net()
    heads = {"a": nn.Linear(5, 3), "b": (torch.randn(4, 5, generator=gen), torch.randn(4, generator=gen))}
    ad = GenericAdapter(net, heads, param_names=["l1.weight", "l1.bias", "l2.weight"])  # l2.bias: not merged
    x = torch.randn(7, 6, generator=gen)
    values = {k: net.get_parameter(k).detach() + 0.1 * torch.randn(net.get_parameter(k).shape, generator=gen)
              for k in ad.param_names()}
    plain = copy.deepcopy(net)
    plain.load_state_dict({**plain.state_dict(), **values})
    # functional forward == the module's own forward (same ops: bitwise)
    assert_same(ad.logits(values, "a", x), heads["a"](plain(x)), "head a")
    w, b = heads["b"]
    assert_same(ad.logits(values, 1, x), plain(x) @ w.t() + b, "head b")
    # mapping inputs are keyword arguments
    assert_same(ad.features(values, {"x": x, "scale": torch.tensor(2.0)}), plain(x) * 2, "kwargs")

    names = ad.param_names()

    class Plain(nn.Module):  # plain module + head a, for autograd's reference gradients
        def __init__(self):
            super().__init__()
            self.net, self.head = plain, copy.deepcopy(heads["a"])

        def forward(self, x):
            return self.head(self.net(x))
    _grads_vs_plain(ad, names, values, "a", x, Plain(), "net.", _loss)
    # nothing else received a gradient: the head module, the non-merged l2.bias, the given module
    assert all(p.grad is None for p in heads["a"].parameters())
    assert all(p.grad is None for p in net.parameters())
    assert heads["a"].weight.requires_grad  # and the head module was not modified


def test_generic_functional_forward_matches_module(gen):
    torch.manual_seed(2)
    net = Net()
    head = nn.Linear(5, 2)

    def forward(params, x):
        h = torch.tanh(F.linear(x, params["l1.weight"], params["l1.bias"]))
        return F.linear(h, params["l2.weight"], params["l2.bias"])
    ad = GenericAdapter(None, [head], forward=forward, param_names=[k for k, _ in net.named_parameters()])
    ref = GenericAdapter(net, [head])
    x = torch.randn(5, 6, generator=gen)
    values = {k: v.detach().clone() for k, v in net.named_parameters()}
    assert_same(ad.logits(values, 0, x), ref.logits(values, 0, x), "functional vs module")
    assert_same(ad.logits(values, 0, x), head(net(x)), "functional vs direct")
    fp = FlatParams.from_tensors(values, ad.param_names())
    _grads_vs_plain(ad, ad.param_names(), values, 0, x, nn.Sequential(copy.deepcopy(net), copy.deepcopy(head)),
                    "0.", _loss)
    assert head.weight.grad is None
    with pytest.raises(ValueError, match="param_names"):
        GenericAdapter(None, [head], forward=forward)
    with pytest.raises(ValueError, match="exactly one"):
        GenericAdapter(net, [head], forward=forward, param_names=["l1.weight"])
    del fp


def test_generic_num_classes_for_head_kinds():
    heads = [nn.Linear(5, 3), torch.zeros(4, 5), (torch.zeros(6, 5), None),
             nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 7), nn.Dropout()),
             lambda f: f[:, :2], nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8))]
    ad = GenericAdapter(Net(), heads)
    assert [ad.num_classes(t) for t in range(len(heads))] == [3, 4, 6, 7, None, None]
    with pytest.raises(TypeError, match="head"):
        GenericAdapter(Net(), [42])


def test_per_task_arguments_are_checked():
    """Heads as a mapping or a list; names must match the mapping, be as many as the heads, be unique."""
    net = nn.Linear(3, 2)
    heads = {"a": nn.Linear(2, 2), "b": nn.Linear(2, 3)}
    assert GenericAdapter(net, heads).task_names == ["a", "b"]
    assert GenericAdapter(net, list(heads.values())).task_names == ["task0", "task1"]
    with pytest.raises(ValueError, match="disagree with the keys of `heads`"):
        GenericAdapter(net, heads, task_names=["b", "a"])
    with pytest.raises(ValueError, match="3 task names for 2 heads"):
        GenericAdapter(net, list(heads.values()), task_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="duplicate task names"):
        GenericAdapter(net, list(heads.values()), task_names=["a", "a"])
    with pytest.raises(ValueError, match="at least one entry of `heads`"):
        GenericAdapter(net, {})


def test_evaluate_per_task_and_mean(gen):
    torch.manual_seed(3)
    net = Net()
    heads = {"a": nn.Linear(5, 3), "b": nn.Linear(5, 4)}
    ad = GenericAdapter(net, heads)
    fp = FlatParams.from_tensors(dict(net.named_parameters()), ad.param_names())
    data, want = {}, {}
    for t, (name, head) in enumerate(heads.items()):
        n = 37 + 11 * t
        x = torch.randn(n, 6, generator=gen)
        pred = head(net(x)).argmax(-1)
        y = torch.randint(0, head.out_features, (n,), generator=gen)
        y[: n // 2] = pred[: n // 2]  # about half right, so a wrong count would show
        data[name] = (x, y) if t == 0 else {"inputs": x, "labels": y}
        want[name] = (pred == y).double().mean().item()
    got = evaluate(ad, fp, data, batch_size=8)  # FlatParams or a mapping
    assert got.keys() == {"a", "b", "mean"}
    for k in heads:
        assert got[k] == pytest.approx(want[k], abs=1e-12)
    assert got["mean"] == pytest.approx((want["a"] + want["b"]) / 2, abs=1e-12)
    names, acc = accuracies(ad, fp.as_dict(), {1: data["b"]}, batch_size=5)
    assert names == ["b"] and acc.dtype == torch.float64 and acc.tolist() == pytest.approx([want["b"]])
    assert accuracy(ad, fp.as_dict(), "a", *data["a"], batch_size=6) == pytest.approx(want["a"])
    x, y = data["a"]
    torch.testing.assert_close(predict_logits(ad, fp, "a", x, batch_size=8), heads["a"](net(x)).detach(),
                               rtol=1e-6, atol=1e-7)
    assert fp.grad.abs().sum() == 0  # evaluation never touches the gradient buffer
    x, y = data["a"]
    with pytest.raises(ValueError, match="3 classes"):
        evaluate(ad, fp, {"a": (x, torch.full_like(y, 3))})
    with pytest.raises(ValueError, match="labels"):
        evaluate(ad, fp, {"a": (x, y[:-1])})
    with pytest.raises(KeyError, match="unknown task"):
        evaluate(ad, fp, {"c": (x, y)})


# ------------------------------------------------------------------------------------------------
# Hugging Face encoders
# ------------------------------------------------------------------------------------------------
# transformers / open_clip are optional extras (.ci/setup.sh installs them): without them only their
# tests skip, the generic ones above still run.
from calm_fast.models.hf import HFEncoderAdapter, hf_encoder_from_modules, load_hf_encoder  # noqa: E402

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
needs_open_clip = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None,
                                     reason="open_clip_torch not installed")

BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=24, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3,
            initializer_range=0.3)  # large weights: logits that differ from sample to sample
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "the a cat dog sat on mat good bad movie".split()


def _finetune(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory):
    """base (a BertModel + tokenizer) and two fine-tuned BertForSequenceClassification folders (3 and 5 labels)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(10)
    base = BertModel(BertConfig(**BERT)).eval()
    base.save_pretrained(root / "base")
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(root / "base")
    tasks = {}
    for i, (name, labels) in enumerate([("sst2", 3), ("mnli", 5)]):
        m = BertForSequenceClassification(BertConfig(**BERT, num_labels=labels))
        m.bert.load_state_dict(base.state_dict())
        _finetune(m.bert, 0.02, 100 + i)
        m.save_pretrained(root / name)
        tasks[name] = m.eval()
    return root, base, tasks


@needs_hf
def test_hf_load_from_folders_splits_encoder_and_heads(bert_folders):
    root, base, tasks = bert_folders
    loaded = load_hf_encoder(root / "base", [root / "sst2", root / "mnli"])
    assert isinstance(loaded, LoadedModels)
    ad, pre, fts = loaded
    assert ad.task_names == ["sst2", "mnli"]  # the folder names
    # merged tensors = the encoder's keys (the base's state-dict keys), in the encoder's order
    assert ad.param_names() == list(base.state_dict().keys())
    assert list(pre) == ad.param_names() and all(list(f) == ad.param_names() for f in fts)
    for k, v in base.state_dict().items():
        assert_same(pre[k], v, k)
    for f, m in zip(fts, tasks.values()):
        for k in ad.param_names():
            assert_same(f[k], m.state_dict()["bert." + k], k)
    # heads: what is not an encoder key
    assert [sorted(ad.head_state_dict(t)) for t in ad.task_names] == [["classifier.bias", "classifier.weight"]] * 2
    assert_same(ad.head_state_dict("mnli")["classifier.weight"], tasks["mnli"].classifier.weight.detach(), "head")
    assert [ad.num_classes(t) for t in range(2)] == [3, 5]
    assert ad.unused_pretrained_keys == []
    # named tasks and the tokenizer of the base folder
    ad2, _, _ = load_hf_encoder(root / "base", {"x": root / "mnli"})
    assert ad2.task_names == ["x"] and ad2.num_classes("x") == 5
    batch = ad.tokenize(["the cat sat on the mat", "a good movie"])
    assert batch["input_ids"][0].tolist() == [2] + [VOCAB.index(w) for w in "the cat sat on the mat".split()] + [3]
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 3


@needs_hf
def test_hf_functional_forward_equals_task_models(bert_folders):
    from transformers import BertForSequenceClassification

    root, base, tasks = bert_folders
    ad, pre, fts = load_hf_encoder(root / "base", [root / "sst2", root / "mnli"])
    batch = ad.tokenize(["the cat sat on the mat", "a good movie", "bad dog"])
    for t, m in enumerate(tasks.values()):
        assert not m.training
        # the task's own forward (dropout 0.3 in the config: equal only in eval mode)
        assert_same(ad.logits(fts[t], t, batch), m(**batch).logits, f"task {t}")
        # base encoder + this task's head == a ForSequenceClassification holding both
        ref = BertForSequenceClassification(m.config).eval()
        ref.load_state_dict({**{"bert." + k: v for k, v in base.state_dict().items()},
                             "classifier.weight": m.classifier.weight, "classifier.bias": m.classifier.bias})
        assert_same(ad.logits(pre, t, batch), ref(**batch).logits, f"base + head {t}")
    # a bare tensor is input_ids
    ids = batch["input_ids"][:1, :4]
    assert_same(ad.logits(fts[0], 0, ids), tasks["sst2"](input_ids=ids).logits, "input_ids only")


@needs_hf
def test_hf_grads_land_in_flat_buffer_heads_frozen(bert_folders):
    root, base, tasks = bert_folders
    ad, pre, fts = load_hf_encoder(root / "base", [root / "sst2", root / "mnli"])
    batch = ad.tokenize(["the cat sat on the mat", "a good movie", "bad dog"])
    plain = copy.deepcopy(tasks["mnli"]).eval()
    plain.bert.load_state_dict(base.state_dict())
    _grads_vs_plain(ad, ad.param_names(), pre, "mnli", batch, plain, "bert.", _loss)
    model = ad.task_model("mnli")
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(p.grad is None for m in tasks.values() for p in m.parameters())  # the given models untouched


@needs_hf
def test_hf_param_names_changed_merges_and_differentiates_only_what_fine_tuning_changed(bert_folders):
    """param_names="changed": only the top layer was fine-tuned, so only its tensors are merged; the forward
    equals the all-parameter adapter's with the same values, and no gradient reaches the frozen layers."""
    root, base, _ = bert_folders
    from transformers import BertConfig, BertForSequenceClassification

    models = {}
    for i, labels in enumerate((3, 4)):
        m = BertForSequenceClassification(BertConfig(**BERT, num_labels=labels)).eval()
        m.bert.load_state_dict(base.state_dict())
        _finetune(m.bert.encoder.layer[1], 0.05, 200 + i)
        models[f"t{i}"] = m
    sub = hf_encoder_from_modules(base, models, param_names="changed")
    full = hf_encoder_from_modules(base, models)
    want = [k for k in full.adapter.param_names() if k.startswith("encoder.layer.1.")]
    assert sub.adapter.param_names() == want and set(sub.pretrained) == set(want)
    params = {k: sub.finetuned[1][k].clone().requires_grad_(True) for k in want}
    batch = torch.randint(5, len(VOCAB), (3, 6))
    got = sub.adapter.logits(params, "t1", batch)
    ref = full.adapter.logits({**full.pretrained, **{k: v.detach() for k, v in params.items()}}, "t1", batch)
    assert_same(got.detach(), ref.detach(), "logits")
    got.sum().backward()
    assert all(params[k].grad is not None for k in want)
    assert all(p.grad is None for p in sub.adapter.encoder.parameters())  # frozen layers: no gradient
    with pytest.raises(ValueError, match="not encoder parameters"):
        hf_encoder_from_modules(base, models, param_names=["encoder.layer.9.nope"])
    with pytest.raises(ValueError, match="'changed'"):
        hf_encoder_from_modules(base, models, param_names="some")


@needs_hf
def test_hf_bad_folders_give_clear_errors(bert_folders, tmp_path):
    from transformers import BertConfig, BertModel

    root, _, _ = bert_folders
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_encoder(tmp_path / "nope", [root / "sst2"])
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        load_hf_encoder(root / "base", [tmp_path / "file.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_encoder(root / "base", [tmp_path / "empty"])
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((root / "base" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights"):
        load_hf_encoder(root / "base", [tmp_path / "cfg"])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{}")
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk"):
        load_hf_encoder(root / "base", [tmp_path / "junk"])
    (tmp_path / "junk" / "config.json").write_text((root / "sst2" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="junk.*cannot be loaded"):  # a valid config, corrupt weights
        load_hf_encoder(root / "base", [tmp_path / "junk"])
    # an encoder-only folder is not a fine-tuned task (its head would be random)
    with pytest.raises(CheckpointError, match="not a fine-tuned sequence-classification"):
        load_hf_encoder(root / "base", [root / "sst2", root / "base"])
    # a base of another size
    BertModel(BertConfig(**{**BERT, "intermediate_size": 48})).save_pretrained(tmp_path / "other")
    with pytest.raises(MismatchError, match="shape"):
        load_hf_encoder(tmp_path / "other", [root / "sst2"])


@needs_hf
def test_hf_roberta_from_modules_head_without_pooler():
    """RoBERTa: the task models' encoder has no pooler and the head is classifier.dense + out_proj;
    the base AutoModel's pooler is reported unused, never merged."""
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

    cfg = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=30, pad_token_id=1, initializer_range=0.3)
    torch.manual_seed(11)
    base = RobertaModel(RobertaConfig(**cfg)).eval()
    tasks = []
    for i, labels in enumerate([2, 4]):
        m = RobertaForSequenceClassification(RobertaConfig(**cfg, num_labels=labels))
        m.roberta.load_state_dict(base.state_dict(), strict=False)
        tasks.append(_finetune(m, 0.02, 200 + i).train())
    cfg_dropout = tasks[0].config.hidden_dropout_prob
    assert cfg_dropout > 0
    # built from models in training mode: the adapter still runs them in eval mode (dropout off)
    ad, pre, fts = hf_encoder_from_modules(base, tasks, task_names=["p", "q"])
    assert all(m.training for m in tasks)  # the given models are not modified
    for m in tasks:
        m.eval()
    assert isinstance(ad, HFEncoderAdapter)
    assert not any(k.startswith("pooler.") for k in ad.param_names())
    assert ad.unused_pretrained_keys == ["pooler.dense.bias", "pooler.dense.weight"]
    assert sorted(ad.head_state_dict("q")) == ["classifier.dense.bias", "classifier.dense.weight",
                                               "classifier.out_proj.bias", "classifier.out_proj.weight"]
    ids = torch.randint(3, 40, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    for t, m in enumerate(tasks):
        assert_same(ad.logits(fts[t], t, {"input_ids": ids, "attention_mask": mask}),
                    m(input_ids=ids, attention_mask=mask).logits, f"roberta task {t}")
    # the base may also be a state dict of a classification model (prefix stripped, head ignored)
    ad2, pre2, _ = hf_encoder_from_modules(tasks[0].state_dict(), tasks)
    assert all(torch.equal(pre2[k], fts[0][k]) for k in ad2.param_names())
    assert ad2.unused_pretrained_keys == []  # the base's own head is not part of its encoder


# ------------------------------------------------------------------------------------------------
# open_clip
# ------------------------------------------------------------------------------------------------
from calm_fast.models.open_clip import (OpenCLIPAdapter, load_classification_head,  # noqa: E402
                                        open_clip_from_state_dicts, visual_state_dict, zeroshot_head)

CLIP_CFG = dict(embed_dim=12, vision_cfg=dict(layers=1, width=16, head_width=8, patch_size=4, image_size=8),
                text_cfg=dict(context_length=12, width=16, heads=2, layers=1))


@pytest.fixture(scope="module")
def clip():
    import open_clip

    torch.manual_seed(20)
    model = open_clip.CLIP(**CLIP_CFG)
    with torch.no_grad():
        model.logit_scale.fill_(4.2)  # exp = 66.7: the scale must be the model's, not a constant 100
    return model


def _literature_head(model, classnames, templates):
    """The task-vector code's build_classification_head, written out (transposes and all)."""
    import open_clip

    model.eval()
    with torch.no_grad():
        rows = []
        for c in classnames:
            texts = open_clip.tokenize([t(c) for t in templates], context_length=12)
            emb = model.encode_text(texts)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            emb = emb.mean(dim=0, keepdim=True)
            emb = emb / emb.norm()
            rows.append(emb)
        w = torch.stack(rows, dim=0)
        w = torch.transpose(w, 0, 2)
        w = w * model.logit_scale.exp()
        w = w.squeeze().float()
        return torch.transpose(w, 0, 1)


@needs_open_clip
def test_open_clip_zeroshot_head_equals_text_tower(clip):
    classes = ["cat", "dog", "car", "tree"]
    templates = [lambda c: f"a photo of a {c}.", lambda c: f"a blurry {c}"]
    clip.train()
    w = zeroshot_head(clip, classes, ["a photo of a {}.", templates[1]])
    assert clip.training and clip.visual.training  # modes restored
    want = _literature_head(clip, classes, templates)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6)
    assert w.shape == (4, 12) and torch.allclose(w.norm(dim=-1), clip.logit_scale.exp().expand(4))
    torch.testing.assert_close(zeroshot_head(clip, classes, ["{}"], scale=1.0).norm(dim=-1), torch.ones(4))


def _finetuned_clip_states(clip, n):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(300 + i)
        out.append({k: (v + 0.05 * torch.randn(v.shape, generator=g)) if k.startswith("visual.") else v.clone()
                    for k, v in clip.state_dict().items()})
    return out


@needs_open_clip
def test_open_clip_forward_equals_literature_and_grads(clip, tmp_path):
    import open_clip

    g = torch.Generator().manual_seed(0)
    heads = {"mnist": torch.randn(3, 12, generator=g),
             "svhn": (torch.randn(5, 12, generator=g), torch.randn(5, generator=g))}
    sds = _finetuned_clip_states(clip, 2)
    # the two key layouts of the literature: open_clip's own (visual.*) and ImageEncoder's (model.visual.*),
    # one of them from a .pt file
    torch.save({"model." + k: v for k, v in sds[1].items()}, tmp_path / "svhn.pt")
    ad, pre, fts = open_clip_from_state_dicts(clip, [sds[0], tmp_path / "svhn.pt"], heads)
    assert ad.task_names == ["mnist", "svhn"] and [ad.num_classes(t) for t in range(2)] == [3, 5]
    assert ad.param_names() == [k for k, _ in clip.named_parameters() if k.startswith("visual.")]
    for k in ad.param_names():
        assert_same(pre[k], clip.state_dict()[k], k)
        assert_same(fts[1][k], sds[1][k], k)
    x = torch.randn(4, 3, 8, 8, generator=g)
    for t, (name, head) in enumerate(heads.items()):
        w, b = (head, None) if isinstance(head, torch.Tensor) else head
        ref = open_clip.CLIP(**CLIP_CFG).eval()
        ref.load_state_dict(sds[t])
        for grad in (False, True):
            # tensors without grad take nn.MultiheadAttention's fused inference path, with grad the
            # regular one (slightly different rounding): compare like with like
            ref.requires_grad_(grad)
            f = ref.encode_image(x)
            f = f / f.norm(dim=-1, keepdim=True)  # the literature's ClassificationHead(normalize=True)
            params = {k: v.clone().requires_grad_(grad) for k, v in fts[t].items()}
            assert_same(ad.logits(params, name, x), F.linear(f, w, b), f"{name}, grad={grad}")

    class ImageHead(nn.Module):  # plain autograd reference: image tower + normalised linear head
        def __init__(self):
            super().__init__()
            self.model = copy.deepcopy(clip).eval()

        def forward(self, x):
            f = self.model.encode_image(x)
            return F.linear(f / f.norm(dim=-1, keepdim=True), heads["svhn"][0], heads["svhn"][1])
    _grads_vs_plain(ad, ad.param_names(), pre, "svhn", x, ImageHead(), "model.", _loss)
    assert all(p.grad is None for p in clip.parameters())
    assert not any(w.requires_grad for w, _ in ad.heads)


class ImageEncoder(nn.Module):
    """Shaped like the task-vector code's ImageEncoder: the open_clip model as `.model`."""

    def __init__(self, model):
        super().__init__()
        self.model = model


@needs_open_clip
def test_open_clip_checkpoint_layouts_and_heads(clip, tmp_path):
    names = [k for k, _ in clip.named_parameters() if k.startswith("visual.")]
    sd = _finetuned_clip_states(clip, 1)[0]
    want = {k: sd[k] for k in names}
    bare = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    for layout in (sd, {"model." + k: v for k, v in sd.items()}, {"module." + k: v for k, v in sd.items()}, bare):
        got = visual_state_dict(layout, names)
        assert list(got) == names and all(got[k] is want[k] for k in names)
    with pytest.raises(MismatchError, match="visual.ln_post.weight"):
        visual_state_dict({k: v for k, v in sd.items() if k != "visual.ln_post.weight"}, names, "ft")
    # a pretrained image tower other than the model's own
    ad, pre, _ = open_clip_from_state_dicts(clip, {"t": sd}, [torch.zeros(2, 12)], pretrained=sd)
    assert all(torch.equal(pre[k], sd[k]) for k in names) and ad.task_names == ["t"]
    assert not torch.equal(clip.visual.conv1.weight, sd["visual.conv1.weight"])  # the model is not modified
    # the literature's fine-tuned files: a whole pickled ImageEncoder (the open_clip model under `.model`)
    enc = ImageEncoder(copy.deepcopy(clip))
    enc.model.load_state_dict(sd)
    torch.save(enc, tmp_path / "image_encoder.pt")
    with pytest.raises(CheckpointError, match="trust_pickle"):
        open_clip_from_state_dicts(clip, [tmp_path / "image_encoder.pt"], [torch.zeros(2, 12)])
    _, _, fts = open_clip_from_state_dicts(clip, [tmp_path / "image_encoder.pt"], [torch.zeros(2, 12)],
                                           trust_pickle=True)
    assert all(torch.equal(fts[0][k], sd[k]) for k in names)
    # heads saved as files: a state dict (weights_only) and a pickled linear module (trust_pickle only)
    lin = nn.Linear(12, 3)
    torch.save(lin.state_dict(), tmp_path / "head_sd.pt")
    torch.save(lin, tmp_path / "head_module.pt")
    w, b = load_classification_head(tmp_path / "head_sd.pt")
    assert torch.equal(w, lin.weight) and torch.equal(b, lin.bias)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        load_classification_head(tmp_path / "head_module.pt")
    w2, _ = load_classification_head(tmp_path / "head_module.pt", trust_pickle=True)
    assert torch.equal(w2, lin.weight)
    with pytest.raises(ValueError, match="2-D"):
        OpenCLIPAdapter(clip, [torch.zeros(12)])
    with pytest.raises(ValueError, match="bias"):
        OpenCLIPAdapter(clip, [(torch.zeros(3, 12), torch.zeros(2))])
