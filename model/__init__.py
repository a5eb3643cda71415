"""ResNet encoder + projector, the fused EMP-SSL objective, and LARS."""
from model.encoder import EMPEncoder, EncoderConfig, build_encoder
from model.lars import LARS, lars_param_groups
from model.loss import emp_ssl_loss, gather_with_grad, invariance, logdet_spd, total_coding_rate

__all__ = [
    "EMPEncoder", "EncoderConfig", "build_encoder",
    "LARS", "lars_param_groups",
    "emp_ssl_loss", "gather_with_grad", "invariance", "logdet_spd", "total_coding_rate",
]
