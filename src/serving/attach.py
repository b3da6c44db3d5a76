"""Putting an adapter into the served model, all or nothing.

peft injects an adapter in place: `PeftModel.from_pretrained` replaces the base's linear
layers by LoRA layers, then loads the tensors, and torch's `load_state_dict` copies every
tensor that fits before it reports the ones that do not. So a load that fails half-way
would leave the served model changed for every later request. Adapters are checked whole
before they get here (src/adapters.check_adapter_fits); should a load still fail, whatever
it injected is taken out again here, so that the model serves exactly what it served before.
peft has no such rollback of its own (`unload()` needs the PeftModel that a failed
`from_pretrained` never returns), hence this module.
"""

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel


def attach_adapter(
    model: PreTrainedModel | PeftModel, name: str, folder: str
) -> PreTrainedModel | PeftModel:
    """`model` with the adapter in `folder` added under `name` (not made active), or, if
    anything fails, `model` as it was, and the error raised."""
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(folder, adapter_name=name, use_safetensors=True)
            return model
        return PeftModel.from_pretrained(model, folder, adapter_name=name, use_safetensors=True)
    except BaseException:
        detach_adapter(model, name)
        raise


def detach_adapter(model: PreTrainedModel | PeftModel, name: str) -> None:
    """Take the adapter `name` out of every layer it reached; on a model that was not a
    PeftModel, put the original linear layers back and forget peft's config."""
    was_peft = isinstance(model, PeftModel)
    if was_peft:
        model.peft_config.pop(name, None)
    base = model.get_base_model() if was_peft else model
    for parent in list(base.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, BaseTunerLayer):
                continue
            child.delete_adapter(name)
            if not was_peft:
                setattr(parent, child_name, child.get_base_layer())
    if not was_peft and hasattr(base, "peft_config"):
        del base.peft_config
