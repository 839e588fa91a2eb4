"""``mamba_hubert`` criterion: fairseq's HuBERT masked-prediction loss plus Mamba diagnostics.

The loss, accuracies and everything the stock ``hubert`` criterion logs come from
``HubertCriterion`` unchanged. Added: ``ssm_delta_<i>``, the mean step size Δ = softplus(dt)
of layer i over valid frames in the batch (averaged over the layer's scan directions). A Δ
drifting towards 0 means a layer stops reading its input; a very large Δ means it forgets
its state at every frame. Configs that name ``hubert`` as criterion keep working with
``mamba_hubert`` models; they just do not log these.
"""
from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.hubert_criterion import HubertCriterion, HubertCriterionConfig
from fairseq.logging import metrics

SSM_PREFIX = "ssm_"


@dataclass
class MambaHubertCriterionConfig(HubertCriterionConfig):
    log_ssm_stats: bool = field(
        default=True, metadata={"help": "log the mean Δ of every Mamba layer while training"}
    )


@register_criterion("mamba_hubert", dataclass=MambaHubertCriterionConfig)
class MambaHubertCriterion(HubertCriterion):
    def __init__(self, task, pred_masked_weight, pred_nomask_weight, loss_weights=None,
                 log_keys=None, log_ssm_stats=True):
        super().__init__(task, pred_masked_weight, pred_nomask_weight, loss_weights, log_keys)
        self.log_ssm_stats = log_ssm_stats

    def forward(self, model, sample, reduce=True, log_pred=False):
        loss, sample_size, logging_output = super().forward(model, sample, reduce, log_pred)
        encoder = getattr(getattr(model, "module", model), "encoder", None)
        if self.log_ssm_stats and hasattr(encoder, "ssm_statistics"):
            logging_output.update(encoder.ssm_statistics())
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        HubertCriterion.reduce_metrics(logging_outputs)
        keys = {k for log in logging_outputs for k in log if k.startswith(SSM_PREFIX)}
        for key in sorted(keys):
            values = [log[key] for log in logging_outputs if key in log]
            metrics.log_scalar(key, sum(values) / len(values), round=4)
