"""The article's DiffusionModel (DDPM training loss and ancestral sampling), plus a DDIM sampler."""

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddpm_torch.schedules import cosine_beta_schedule, linear_beta_schedule, sigmoid_beta_schedule


def extract(a, t, x_shape):
    """Gather a[t] per batch element and shape it to broadcast against x."""
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def normalize_to_neg_one_to_one(img):
    return img * 2 - 1


def unnormalize_to_zero_to_one(t):
    return (t + 1) * 0.5


def identity(t):
    return t


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Descending DDIM times, ending at -1 (meaning "return x0"): floor(linspace(-1, T-1, steps+1)) reversed."""
    return [i * num_timesteps // steps - 1 for i in range(steps, -1, -1)]


class DiffusionModel(nn.Module):
    SCHEDULER_MAPPING = {
        "linear": linear_beta_schedule,
        "cosine": cosine_beta_schedule,
        "sigmoid": sigmoid_beta_schedule,
    }

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        *,
        beta_scheduler: str = "linear",
        timesteps: int = 1000,
        schedule_fn_kwargs: dict | None = None,
        auto_normalize: bool = True,
        loss_type: str = "l2",
        same_timestep_for_batch: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.channels = self.model.channels
        self.image_size = image_size
        self.loss_type = loss_type
        # The article draws ONE t for the whole batch in forward; DDPM's Algorithm 1 draws one per sample.
        self.same_timestep_for_batch = same_timestep_for_batch
        self.beta_scheduler_fn = self.SCHEDULER_MAPPING.get(beta_scheduler)
        if self.beta_scheduler_fn is None:
            raise ValueError(f"unknown beta schedule {beta_scheduler}")
        if schedule_fn_kwargs is None:
            schedule_fn_kwargs = {}
        betas = self.beta_scheduler_fn(timesteps, **schedule_fn_kwargs)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)

        def register_buffer(name, val):
            self.register_buffer(name, val.to(torch.float32))

        register_buffer("betas", betas)
        register_buffer("alphas_cumprod", alphas_cumprod)
        register_buffer("alphas_cumprod_prev", alphas_cumprod_prev)
        register_buffer("sqrt_recip_alphas", torch.sqrt(1.0 / alphas))
        register_buffer("sqrt_alphas_cumprod", torch.sqrt(alphas_cumprod))
        register_buffer("sqrt_one_minus_alphas_cumprod", torch.sqrt(1.0 - alphas_cumprod))
        register_buffer("posterior_variance", posterior_variance)

        timesteps, *_ = betas.shape
        self.num_timesteps = int(timesteps)
        self.sampling_timesteps = timesteps
        self.normalize = normalize_to_neg_one_to_one if auto_normalize else identity
        self.unnormalize = unnormalize_to_zero_to_one if auto_normalize else identity

    @torch.inference_mode()
    def p_sample(self, x: torch.Tensor, timestamp: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1}; `noise` (default: fresh) is the step's standard normal draw."""
        b = x.shape[0]
        batched_timestamps = torch.full((b,), timestamp, device=x.device, dtype=torch.long)
        preds = self.model(x, batched_timestamps)
        betas_t = extract(self.betas, batched_timestamps, x.shape)
        sqrt_recip_alphas_t = extract(self.sqrt_recip_alphas, batched_timestamps, x.shape)
        sqrt_one_minus_alphas_cumprod_t = extract(self.sqrt_one_minus_alphas_cumprod, batched_timestamps, x.shape)
        predicted_mean = sqrt_recip_alphas_t * (x - betas_t * preds / sqrt_one_minus_alphas_cumprod_t)
        if timestamp == 0:
            return predicted_mean
        posterior_variance = extract(self.posterior_variance, batched_timestamps, x.shape)
        if noise is None:
            noise = torch.randn_like(x)
        return predicted_mean + torch.sqrt(posterior_variance) * noise

    @torch.inference_mode()
    def p_sample_loop(self, shape: tuple, device=None) -> torch.Tensor:
        """Sample x_0 from noise with the T ancestral steps of DDPM (Algorithm 2)."""
        device = default_device(self) if device is None else device
        img = torch.randn(shape, device=device)
        for t in tqdm(reversed(range(0, self.num_timesteps)), total=self.num_timesteps, disable=None):
            img = self.p_sample(img, t)
        return self.unnormalize(img)

    @torch.inference_mode()
    def ddim_step(
        self,
        x: torch.Tensor,
        timestamp: int,
        prev_timestamp: int,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """One DDIM step (Song et al. 2021, eq. 12) from t to prev_timestamp (< t); -1 returns the x0 estimate."""
        b = x.shape[0]
        batched_timestamps = torch.full((b,), timestamp, device=x.device, dtype=torch.long)
        pred_noise = self.model(x, batched_timestamps)
        alpha = self.alphas_cumprod[timestamp]
        x_start = (x - torch.sqrt(1 - alpha) * pred_noise) / torch.sqrt(alpha)
        if clip_denoised:
            x_start = x_start.clamp(-1.0, 1.0)
            pred_noise = (x - torch.sqrt(alpha) * x_start) / torch.sqrt(1 - alpha)
        if prev_timestamp < 0:
            return x_start
        alpha_next = self.alphas_cumprod[prev_timestamp]
        sigma = eta * torch.sqrt((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha))
        c = torch.sqrt(1 - alpha_next - sigma**2)
        if noise is None:
            noise = torch.randn_like(x)
        return x_start * torch.sqrt(alpha_next) + c * pred_noise + sigma * noise

    @torch.inference_mode()
    def ddim_sample(
        self,
        shape: tuple,
        steps: int = 50,
        eta: float = 0.0,
        device=None,
    ) -> torch.Tensor:
        """DDIM sampling with `steps` model calls; eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        device = default_device(self) if device is None else device
        times = ddim_timesteps(self.num_timesteps, steps)
        img = torch.randn(shape, device=device)
        for t, t_prev in tqdm(list(zip(times[:-1], times[1:])), disable=None):
            img = self.ddim_step(img, t, t_prev, eta)
        return self.unnormalize(img)

    def sample(self, batch_size: int = 16) -> torch.Tensor:
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(shape)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn_like(x_start)
        sqrt_alphas_cumprod_t = extract(self.sqrt_alphas_cumprod, t, x_start.shape)
        sqrt_one_minus_alphas_cumprod_t = extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape)
        return sqrt_alphas_cumprod_t * x_start + sqrt_one_minus_alphas_cumprod_t * noise

    def p_loss(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        loss_type: str = "l2",
    ) -> torch.Tensor:
        if noise is None:
            noise = torch.randn_like(x_start)
        x_noised = self.q_sample(x_start, t, noise=noise)
        predicted_noise = self.model(x_noised, t)
        if loss_type == "l2":
            loss = F.mse_loss(noise, predicted_noise)
        elif loss_type == "l1":
            loss = F.l1_loss(noise, predicted_noise)
        else:
            raise ValueError(f"unknown loss type {loss_type}")
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch of images in [0, 1] (NCHW)."""
        b, c, h, w = x.shape
        assert h == w == self.image_size, f"image size must be {self.image_size}"
        num_t = 1 if self.same_timestep_for_batch else b
        timestamp = torch.randint(0, self.num_timesteps, (num_t,), device=x.device).long().expand(b)
        x = self.normalize(x)
        return self.p_loss(x, timestamp, loss_type=self.loss_type)


def default_device(module: nn.Module) -> torch.device:
    """The device the module's buffers live on (the article hard-coded "mps")."""
    return next(module.buffers()).device
