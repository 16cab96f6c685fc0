"""Model registry: `create_model` builds our own architectures or any timm model by name."""

from imgcls.models.registry import ModelError, create_model, list_custom_models, register_model

__all__ = ["ModelError", "create_model", "list_custom_models", "register_model"]
