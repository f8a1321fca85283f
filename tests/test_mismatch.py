"""Models that do not line up, in the ways that look harmless: a fine-tuned tensor transposed or reshaped
(same number of elements, so an element-count check would merge it silently), and a dtype that differs
only in a model other than the first.  In memory (calm_fast.methods) and streamed (merge_checkpoints)."""
import pytest
import torch

from calm_fast import methods
from calm_fast.io import MismatchError
from calm_fast.streaming import merge_checkpoints
from conftest import assert_same

METHODS = {
    "task_arithmetic": (methods.task_arithmetic, {}),
    "ties_merging": (methods.ties_merging, {"density": 0.5}),
    "dare_merging": (methods.dare_merging, {"p": 0.3}),
    "consensus_merging": (methods.consensus_merging, {}),
}
# same numel as (4, 6), other shapes
SAME_NUMEL = {"transposed": lambda x: x.t().contiguous(), "reshaped": lambda x: x.reshape(3, 8),
              "flattened": lambda x: x.reshape(-1), "unsqueezed": lambda x: x.reshape(1, 4, 6)}


def _models(gen, T=3, dtype=torch.float32):
    base = {"a.w": torch.randn(4, 6, generator=gen).to(dtype), "b.bias": torch.randn(5, generator=gen).to(dtype)}
    fts = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(dtype) for k, v in base.items()}
           for _ in range(T)]
    return base, fts


@pytest.mark.parametrize("how", sorted(SAME_NUMEL))
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("task_vectors", [False, True], ids=["finetuned", "task_vectors"])
def test_same_numel_shape_mismatch_in_memory(gen, method, how, task_vectors):
    fn, kw = METHODS[method]
    base, fts = _models(gen)
    bad = 2 if not task_vectors else 1  # never the first model (task vectors are checked against model 0)
    fts[bad]["a.w"] = SAME_NUMEL[how](fts[bad]["a.w"])
    with pytest.raises(ValueError, match=rf"shape mismatch for 'a\.w': model {bad} has"):
        if task_vectors:
            fn(None, fts, task_vectors=True, **kw)
        else:
            fn(base, fts, **kw)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                    (torch.float16, torch.float32)], ids=["f32_bf16", "bf16_f16", "f16_f32"])
def test_dtype_mismatch_on_a_later_model_in_memory(gen, method, dtypes):
    fn, kw = METHODS[method]
    base, fts = _models(gen, dtype=dtypes[0])
    fts[2]["b.bias"] = fts[2]["b.bias"].to(dtypes[1])
    with pytest.raises(ValueError, match=r"dtype mismatch for 'b\.bias': model 2 has"):
        fn(base, fts, **kw)
    with pytest.raises(ValueError, match=r"dtype mismatch for 'b\.bias': model 2 has"):
        fn(None, fts, task_vectors=True, **kw)


@pytest.mark.parametrize("how", sorted(SAME_NUMEL))
def test_same_numel_shape_mismatch_streaming(gen, tmp_path, how):
    base, fts = _models(gen)
    fts[1]["a.w"] = SAME_NUMEL[how](fts[1]["a.w"])
    with pytest.raises(MismatchError, match=r"shape mismatch for 'a\.w'.*model 1"):
        merge_checkpoints(base, fts, "ties", density=0.5)
    # skip: model 1 contributes nothing to a.w (an unchanged tensor), everything else as usual
    r = merge_checkpoints(base, fts, "ta", on_mismatch="skip")
    fixed = [dict(f) for f in fts]
    fixed[1]["a.w"] = base["a.w"].clone()
    want = methods.task_arithmetic(base, fixed)
    for k in base:
        assert_same(r.state_dict[k], want[k], k)
    assert any("shape mismatch for 'a.w'" in line for line in r.report)


@pytest.mark.parametrize("method", ["ta", "ties", "dare_ties"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                    (torch.float16, torch.float32)], ids=["f32_bf16", "bf16_f16", "f16_f32"])
def test_dtype_mismatch_on_a_later_model_streaming(gen, method, dtypes):
    """Streaming merges mixed dtypes from exact fp32 copies: a tensor of model 2 in another dtype than the
    base and the other models must be read in its own dtype (not reinterpreted, not rounded to the base's
    dtype first) and give the fp32 merge of the same values, rounded once to the base's dtype."""
    base, fts = _models(gen, dtype=dtypes[0])
    fts[2]["a.w"] = (fts[2]["a.w"].float() + 1e-3 * torch.randn(4, 6, generator=gen)).to(dtypes[1])
    kw = {"ta": {}, "ties": {"density": 0.5}, "dare_ties": {"p": 0.3, "density": 0.5}}[method]
    r = merge_checkpoints(base, fts, method, **kw)
    as_f32 = lambda sd: {k: v.float() for k, v in sd.items()}  # exact for every input dtype
    fn = {"ta": methods.task_arithmetic, "ties": methods.ties_merging, "dare_ties": methods.dare_merging}[method]
    want = fn(as_f32(base), [as_f32(f) for f in fts], out_dtype=dtypes[0],
              **(dict(kw, combine="ties") if method == "dare_ties" else kw))
    for k in base:
        assert_same(r.state_dict[k], want[k], k)
