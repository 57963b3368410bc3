"""Knowledge distillation losses: channel-wise distillation (CWD) for dense maps and classic
logit distillation (KD).

CWD (Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021) turns
every channel of a (N, C, H, W) map into a distribution over its H*W positions with a softmax at
temperature tau, and makes the student match the teacher's distribution channel by channel:

    loss = tau^2 / (N * C) * sum_{n,c} KL(softmax(t_nc / tau) || softmax(s_nc / tau))

It applies to a detector's FPN features and classification logits level by level
(`DetectorDistillLoss`), and to a classifier's class activation maps (`classifier_distillation`).

KD (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015) matches the softened
output distribution of each sample. Our classifier and the FCOS classification head are both
multi-label (one sigmoid per class, no softmax across classes), so the default is the binary
form: each logit defines a Bernoulli distribution sigmoid(z / tau), and the loss is their KL
divergence, averaged over all logits and scaled by tau^2. The softmax form is there for
single-label classifiers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from core.detectors import LEVEL_NAMES


def channel_wise_distillation(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """CWD loss between two maps of the same shape.

    Args:
        student: (N, C, H, W) activations or logits, any float dtype.
        teacher: (N, C, H, W), same shape. Detach it yourself if it must get no gradient.
        tau: softmax temperature, > 0.

    Returns:
        Scalar float32 tensor: sum over (n, c) of KL(teacher_nc || student_nc) over the H*W
        positions, times tau^2, divided by N*C. Zero when student == teacher.

    Both inputs are cast to float32 and go through log_softmax: in float16, or with the
    softmax-then-log form, activations around 100 overflow exp() or underflow to log(0).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ; "
            "use CWDLoss, which adapts channels and resizes"
        )
    if student.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) maps, got shape {tuple(student.shape)}")
    n, c, h, w = student.shape
    log_p_student = F.log_softmax(student.float().reshape(n * c, h * w) / tau, dim=1)
    log_p_teacher = F.log_softmax(teacher.float().reshape(n * c, h * w) / tau, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum()
    return kl * (tau**2) / (n * c)


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0, *, multi_label: bool = True
) -> Tensor:
    """Classic logit distillation (Hinton et al. 2015), scaled by tau^2.

    Args:
        student_logits: (..., K) raw logits.
        teacher_logits: (..., K) raw logits, same shape; detach it yourself.
        tau: temperature, > 0.
        multi_label: True for sigmoid (multi-label) classifiers: the KL divergence between the
            Bernoulli distributions sigmoid(t/tau) and sigmoid(s/tau) of every logit, averaged
            over all (..., K) logits. False for softmax classifiers: KL between
            softmax(t/tau) and softmax(s/tau) over the last axis, averaged over the leading
            axes.

    Returns:
        Scalar float32 tensor, zero when the logits are equal. Computed from log-sigmoid /
        log-softmax in float32 so large logits do not overflow.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits differ in shape"
        )
    student_logits = student_logits.float() / tau
    teacher_logits = teacher_logits.float() / tau
    if multi_label:
        log_p_t, log_q_t = F.logsigmoid(teacher_logits), F.logsigmoid(-teacher_logits)
        log_p_s, log_q_s = F.logsigmoid(student_logits), F.logsigmoid(-student_logits)
        kl = log_p_t.exp() * (log_p_t - log_p_s) + log_q_t.exp() * (log_q_t - log_q_s)
        return kl.mean() * tau**2
    log_p_t = F.log_softmax(teacher_logits, dim=-1)
    log_p_s = F.log_softmax(student_logits, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return kl.mean() * tau**2


class CWDLoss(nn.Module):
    """CWD between a student map and a teacher map that may differ in channels and size.

    A learned 1x1 convolution maps the student's channels to the teacher's when they differ
    (trained with the student, dropped after training); the student map is then resized
    bilinearly to the teacher's H x W when those differ.

    forward(student (N, C_s, H_s, W_s), teacher (N, C_t, H_t, W_t)) -> scalar; the teacher is
    detached.
    """

    def __init__(self, student_channels: int, teacher_channels: int, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = tau
        self.adaptor: nn.Module = (
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            if student_channels != teacher_channels
            else nn.Identity()
        )

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        student = self.adaptor(student)
        if student.shape[-2:] != teacher.shape[-2:]:
            student = F.interpolate(
                student, size=teacher.shape[-2:], mode="bilinear", align_corners=False
            )
        return channel_wise_distillation(student, teacher.detach(), self.tau)


@dataclass
class DistillConfig:
    """How a student detector learns from its teacher.

    kind: "none", "kd" (classic binary KD on the per-location class logits) or "cwd" (CWD on
    each FPN level's features and on each level's class logits).
    teacher: path of the teacher's checkpoint (from train_detector); needed unless kind is
    "none".
    tau: temperature of both CWD terms; kd_tau the temperature of KD.
    feature_weight / logit_weight: weight of each level's feature and logit term; a weight of
    0 leaves that term out.
    """

    kind: str = "none"
    teacher: str | None = None
    tau: float = 1.0
    kd_tau: float = 2.0
    feature_weight: float = 2.0
    logit_weight: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "kd", "cwd"):
            raise ValueError(f"distill kind must be none, kd or cwd, not {self.kind!r}")
        if self.tau <= 0 or self.kd_tau <= 0:
            raise ValueError("distillation temperatures must be positive")


class DetectorDistillLoss(nn.Module):
    """Per-level distillation terms for an FCOS student and teacher on the same pyramid grid.

    forward(student_features, student_logits, teacher_features, teacher_logits) takes lists
    over pyramid levels (P3..P7): features (N, C_s|C_t, H_l, W_l), logits (N, K, H_l, W_l),
    and returns weighted scalar terms, one per level and kind, named e.g. "cwd_feat_p3",
    "cwd_logit_p5" or "kd_logit_p4", so each can be logged on its own. Its parameters (the
    channel adaptors) must be trained with the student.
    """

    def __init__(
        self,
        config: DistillConfig,
        student_channels: int,
        teacher_channels: int,
        num_levels: int = len(LEVEL_NAMES),
    ) -> None:
        super().__init__()
        if config.kind == "none":
            raise ValueError("DetectorDistillLoss needs distill kind kd or cwd")
        self.config = config
        self.levels = LEVEL_NAMES[:num_levels]
        use_features = config.kind == "cwd" and config.feature_weight > 0
        # Only created when used: DistributedDataParallel wants every parameter to get a grad.
        self.feature_losses = nn.ModuleList(
            [CWDLoss(student_channels, teacher_channels, config.tau) for _ in self.levels]
            if use_features
            else []
        )

    def forward(
        self,
        student_features: list[Tensor],
        student_logits: list[Tensor],
        teacher_features: list[Tensor],
        teacher_logits: list[Tensor],
    ) -> dict[str, Tensor]:
        config = self.config
        terms: dict[str, Tensor] = {}
        for index, level in enumerate(self.levels):
            if self.feature_losses:
                loss = self.feature_losses[index](student_features[index], teacher_features[index])
                terms[f"cwd_feat_{level}"] = config.feature_weight * loss
            if config.logit_weight <= 0:
                continue
            if config.kind == "cwd":
                loss = channel_wise_distillation(
                    student_logits[index], teacher_logits[index].detach(), config.tau
                )
                terms[f"cwd_logit_{level}"] = config.logit_weight * loss
            else:
                # (N, K, H, W) -> one K-way multi-label prediction per location.
                k = student_logits[index].shape[1]
                student = student_logits[index].permute(0, 2, 3, 1).reshape(-1, k)
                teacher = teacher_logits[index].detach().permute(0, 2, 3, 1).reshape(-1, k)
                terms[f"kd_logit_{level}"] = config.logit_weight * kd_loss(
                    student, teacher, config.kd_tau
                )
        return terms


def classifier_distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_cams: Tensor | None = None,
    teacher_cams: Tensor | None = None,
    *,
    kd_tau: float = 2.0,
    cam_tau: float = 1.0,
    kd_weight: float = 1.0,
    cam_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Distil a multi-label image classifier: binary KD on its logits and CWD on its CAMs.

    Args:
        student_logits, teacher_logits: (N, K) raw logits of sigmoid classifiers.
        student_cams, teacher_cams: optional (N, K, h, w) class activation maps (before any
            normalisation to [0, 1], which would flatten the spatial softmax); the student's
            are resized to the teacher's size when they differ.

    Returns:
        {"kd_logits": scalar, "cwd_cam": scalar (only when CAMs are given)}, already weighted.
    """
    terms = {"kd_logits": kd_weight * kd_loss(student_logits, teacher_logits.detach(), kd_tau)}
    if student_cams is not None and teacher_cams is not None:
        if student_cams.shape[-2:] != teacher_cams.shape[-2:]:
            student_cams = F.interpolate(
                student_cams, size=teacher_cams.shape[-2:], mode="bilinear", align_corners=False
            )
        terms["cwd_cam"] = cam_weight * channel_wise_distillation(
            student_cams, teacher_cams.detach(), cam_tau
        )
    return terms


__all__ = [
    "CWDLoss",
    "DetectorDistillLoss",
    "DistillConfig",
    "channel_wise_distillation",
    "classifier_distillation",
    "kd_loss",
]
