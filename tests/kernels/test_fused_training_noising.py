"""The diffusion trainer swaps in the fused q_sample kernel when the backend is 'triton' (GPU; interpreter here)."""
import torch

from polygrad_fast import diffusion_trainer
from polygrad_fast.denoisers import MLPDenoiserConfig, ResidualMLPDenoiser
from polygrad_fast.diffusion_trainer import DiffusionTrainer, DiffusionTrainerConfig
from polygrad_fast.step_ops import q_sample as torch_q_sample
from polygrad_fast.schedule import NoiseSchedule


class _Windows:
    def __init__(self, device, B=3, H=4, O=5, A=2):
        g = torch.Generator().manual_seed(0)
        self.observations = torch.randn(B, H, O, generator=g).to(device)
        self.actions = torch.randn(B, H, A, generator=g).to(device)
        self.rewards = torch.randn(B, H, generator=g).to(device)
        self.terminals = torch.zeros(B, H, device=device)


def _trainer(device, monkeypatch, backend_name):
    monkeypatch.setattr(diffusion_trainer.backend, "select_backend", lambda dev, requested="auto": backend_name)
    torch.manual_seed(0)
    model = ResidualMLPDenoiser(4, 7, 2, MLPDenoiserConfig(hidden_dim=32, num_layers=1)).to(device)
    return DiffusionTrainer(model, NoiseSchedule(8), DiffusionTrainerConfig(mixed_precision="fp32"))


def test_triton_backend_uses_fused_q_sample_with_identical_training(device, monkeypatch):
    fused = _trainer(device, monkeypatch, "triton")
    plain = _trainer(device, monkeypatch, "torch")
    assert fused.loss_fn.noising_fn is not torch_q_sample
    assert plain.loss_fn.noising_fn is torch_q_sample
    batch = _Windows(device)
    for _ in range(3):
        m_fused, m_plain = fused.train_step(batch), plain.train_step(batch)
        for key in m_plain:
            assert abs(m_fused[key] - m_plain[key]) <= 1e-5 * max(1.0, abs(m_plain[key])), (key, m_fused, m_plain)
