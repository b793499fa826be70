"""The reference trains: gradients reach every parameter and a few AdamW steps lower the §4.4 loss."""

import pytest

from starflow_mlx.config import FlowConfig

torch = pytest.importorskip("torch")


def test_training_steps_lower_the_loss():
    from tests.reference import StarFlow
    from tests.reference.train import flow_loss, make_optimizer, train_step

    torch.manual_seed(0)
    config = FlowConfig(in_channels=4, img_size=4, channels=32, layers_per_block=[1, 1, 1], txt_size=4, txt_dim=8,
                        head_dim=16, soft_clip=4.0, seq_order="L2R")
    model = StarFlow(config)
    x = torch.randn(8, 4, 4, 4).cumsum(-1) * 0.5  # correlated data a flow can learn
    text = torch.randn(8, 4, 8)
    loss = flow_loss(model, x, text, 0.3)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    opt = make_optimizer(model, lr=3e-3)
    torch.manual_seed(1)
    losses = [train_step(model, opt, x, text, 0.3) for _ in range(30)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
