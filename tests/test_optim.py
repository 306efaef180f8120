import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig, OptimizerConfig
from jaxlm.model import Transformer
from jaxlm.optim import decay_mask, schedule


def test_weight_decay_skips_norms_and_embeddings():
    model = Transformer(ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, d_ff=32),
                        causal=True, rngs=nnx.Rngs(0))
    mask = nnx.to_pure_dict(decay_mask(OptimizerConfig(), nnx.state(model, nnx.Param)))
    assert mask["blocks"]["attn"]["q"]["kernel"] and mask["blocks"]["mlp"]["down"]["kernel"]
    assert not mask["embed"]["embedding"]
    assert not mask["final_norm"]["scale"] and not mask["blocks"]["attn_norm"]["scale"]
    mask = nnx.to_pure_dict(
        decay_mask(OptimizerConfig(no_decay=("scale",)), nnx.state(model, nnx.Param))
    )
    assert mask["embed"]["embedding"]


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lr = schedule(cfg, total_steps=100)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.5, 1.0], atol=1e-6)
    assert lr(50) < lr(20) < 1.0
    np.testing.assert_allclose(lr(100), 0.1, atol=1e-6)
