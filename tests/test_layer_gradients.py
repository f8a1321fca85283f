"""Per-layer weight gradients (mergekit's ``weight: [a, b, c, ...]``) and the YAML weight/density mapping,
against values computed by hand.

A gradient of n points spreads over the layers: layer i of N sits at t = i / (N - 1), x = t (n - 1), and
the weight is the linear interpolation between points floor(x) and floor(x) + 1.  Tensors outside the
layers sit at t = 0 (embeddings) or t = 1 (final norm, head).  The tables below were worked out on paper
for N = 6 layers, where every inner layer falls strictly between two points."""
import math

import pytest
import torch
import yaml

from calm_fast import cli, methods
from calm_fast.io import load_state_dict, save_state_dict
from calm_fast.streaming import merge_checkpoints, weight_for
from conftest import assert_same

N_LAYERS = 6
# spec -> weights of layers 0..5 (x = 2i/5 resp. 3i/5), embeddings, norm/head
HAND = {
    (0.0, 1.0, 0.5): ([0.0, 0.4, 0.8, 0.9, 0.7, 0.5], 0.0, 0.5),
    (1.0, 3.0, -1.0, 2.0): ([1.0, 2.2, 2.2, -0.2, 0.2, 2.0], 1.0, 2.0),
    (2.0, 0.0, 0.0, 0.0, 4.0): ([2.0, 0.4, 0.0, 0.0, 0.8, 4.0], 2.0, 4.0),
}


def _names():
    return (["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.w" for i in range(N_LAYERS)]
            + ["model.norm.weight", "lm_head.weight"])


def _hand(spec, name):
    layers, pre, post = HAND[spec]
    if "layers." in name:
        return layers[int(name.split("layers.")[1].split(".")[0])]
    return pre if "embed" in name else post


@pytest.mark.parametrize("spec", sorted(HAND), ids=lambda s: "-".join(str(v) for v in s))
def test_gradient_values_by_hand(spec):
    for name in _names():
        got = weight_for(list(spec), name, N_LAYERS)
        assert got == pytest.approx(_hand(spec, name), abs=1e-12), name


def test_gradient_in_filter_entries():
    spec = [{"filter": "mlp", "value": [0.0, 1.0, 0.5]}, {"value": 3.0}]
    assert weight_for(spec, "model.layers.3.mlp.w", N_LAYERS) == pytest.approx(0.9, abs=1e-12)
    assert weight_for(spec, "model.layers.3.attn.w", N_LAYERS) == 3.0


def _models(gen, T=2):
    shapes = {"model.embed_tokens.weight": (7, 4), "model.norm.weight": (4,), "lm_head.weight": (3, 4)}
    shapes.update({f"model.layers.{i}.mlp.w": (4, 4) for i in range(N_LAYERS)})
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(T)]
    return base, fts


def _ta_oracle(base, fts, specs, lam):
    """θ0 + λ Σ_t w_t τ_t in fp32 with the hand weights (fp32, tasks in order)."""
    out = {}
    for k in base:
        acc = torch.zeros_like(base[k])
        for ft, spec in zip(fts, specs):
            w = torch.tensor(_hand(spec, k), dtype=torch.float32)
            acc = acc + w * (ft[k] - base[k])
        out[k] = base[k] + lam * acc
    return out


def test_streamed_merge_with_gradients(gen):
    base, fts = _models(gen)
    specs = [(0.0, 1.0, 0.5), (1.0, 3.0, -1.0, 2.0)]
    r = merge_checkpoints(base, fts, "ta", scaling=0.5, weights=[list(s) for s in specs])
    want = _ta_oracle(base, fts, specs, 0.5)
    for k in base:
        assert_same(r.state_dict[k], want[k], k)


def _run_yaml(tmp_path, cfg):
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    rc = cli.main(["merge", "--config", str(tmp_path / "merge.yaml"), "-o", str(tmp_path / "out"), "-q",
                   "--overwrite"])
    assert rc == 0
    return load_state_dict(tmp_path / "out")


def test_yaml_gradient_weights(gen, tmp_path):
    base, fts = _models(gen, T=3)
    save_state_dict(base, tmp_path / "base")
    for i, f in enumerate(fts):
        save_state_dict(f, tmp_path / f"ft{i}")
    specs = [(0.0, 1.0, 0.5), (2.0, 0.0, 0.0, 0.0, 4.0), (1.0, 3.0, -1.0, 2.0)]
    cfg = {"format": "calm-fast", "merge_method": "task_arithmetic", "base_model": "base",
           "models": [{"model": "ft0", "parameters": {"weight": list(specs[0])}},
                      {"model": "ft1", "parameters": {"weight": list(specs[1])}},
                      "ft2"],  # takes the default weight spec below
           "parameters": {"lambda": 0.25, "weight": list(specs[2])}}
    got = _run_yaml(tmp_path, cfg)
    want = _ta_oracle(base, fts, specs, 0.25)
    for k in base:
        assert_same(got[k], want[k], k)


# ------------------------------------------------------------------------------------------------
# the YAML per-model weight / density mapping (TIES)
# ------------------------------------------------------------------------------------------------
def _merge_kwargs(tmp_path, cfg):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    args = cli.make_parser().parse_args(["merge", "--config", str(tmp_path / "m.yaml")])
    return cli.build_merge_kwargs(args)


YAML_TIES = {"format": "calm-fast", "merge_method": "ties", "base_model": "base",
             "models": [{"model": "ft0", "parameters": {"weight": 2.0, "density": 0.4}},
                        {"model": "ft1", "parameters": {"density": 0.8}},
                        {"model": "ft2", "parameters": {"weight": 0.25}}],
             "parameters": {"weight": 0.5, "density": 0.3, "lambda": 0.7}}


def test_yaml_per_model_mapping(tmp_path):
    kw = _merge_kwargs(tmp_path, YAML_TIES)
    assert kw["density"] == [0.4, 0.8, 0.3]  # model 2 gives none: the global density
    assert kw["weights"] == [2.0, 0.5, 0.25]  # model 1 gives none: the default weight
    assert kw.get("scaling", kw.get("lambda")) == 0.7
    assert [str(m)[-3:] for m in kw["models"]] == ["ft0", "ft1", "ft2"]


def _ties_weighted_oracle(base, fts, dens, weights, lam):
    """TIES (sum, global): task t keeps |τ_t| >= its own (n - floor(d_t n))-th smallest |τ_t| over the
    sorted flattened keys, the kept values times w_t are elected and summed; fp32."""
    keys = sorted(base)
    flat_b = torch.cat([base[k].reshape(-1) for k in keys])
    vals = []
    for ft, d, w in zip(fts, dens, weights):
        tau = torch.cat([ft[k].reshape(-1) for k in keys]) - flat_b
        n = tau.numel()
        thr = torch.kthvalue(tau.abs(), n - math.floor(d * n)).values
        vals.append(torch.where(tau.abs() >= thr, tau * torch.tensor(w), torch.zeros(())))
    s = vals[0]
    for v in vals[1:]:
        s = s + v
    g = torch.sign(s)
    g = torch.where(g == 0, torch.tensor(1.0 if int(torch.sign(s).sum()) >= 0 else -1.0), g)
    r = torch.zeros_like(s)
    for v in vals:
        r = r + torch.where(((g > 0) & (v > 0)) | ((g < 0) & (v < 0)), v, torch.zeros(()))
    merged = flat_b + lam * r
    out, i = {}, 0
    for k in keys:
        out[k] = merged[i:i + base[k].numel()].reshape(base[k].shape)
        i += base[k].numel()
    return out


def test_yaml_per_model_weight_and_density_merge(gen, tmp_path):
    base, fts = _models(gen, T=3)
    save_state_dict(base, tmp_path / "base")
    for i, f in enumerate(fts):
        save_state_dict(f, tmp_path / f"ft{i}")
    got = _run_yaml(tmp_path, YAML_TIES)
    want = _ties_weighted_oracle(base, fts, [0.4, 0.8, 0.3], [2.0, 0.5, 0.25], 0.7)
    for k in base:
        assert_same(got[k], want[k], k)
