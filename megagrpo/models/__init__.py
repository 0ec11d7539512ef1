"""megatron-core models built from Hugging Face configs, and the HF <-> megatron weight mapping."""

from megagrpo.models.arch import ArchitectureError, ModelArch, arch_from_hf_config, load_arch

__all__ = ["ArchitectureError", "ModelArch", "arch_from_hf_config", "load_arch"]
