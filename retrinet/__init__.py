"""Conditioning models over the SD U-Net and sampling with references (docs/design.md sections 3, 3b).

RetriNet (the paper's retrieval encoder and its cross-attention injection) and the ControlNet and
IP-Adapter baselines are sibling subclasses of `ReferenceUNet`; `generate` samples with any of them.
"""
from .attention_maps import AttentionRecorder, render_attention_grid
from .base import LOCKS, MethodOptions, ReferenceUNet
from .checkpoints import METHODS, CheckpointInfo, build_model, inspect_checkpoint, load_reference_model
from .controlnet import ControlNet, ControlNetConfig, ControlNetUNet
from .ip_adapter import IPAdapter, IPAdapterConfig, IPAdapterUNet, ImageProjection, load_ip_adapter, official_numbers
from .model import ReferenceCrossAttention, RetriNet, RetriNetConfig, RetriUNet
from .sampling import ReferenceGuidance, generate, png_parameters, reference_problems

__all__ = ["ReferenceUNet", "RetriUNet", "RetriNet", "RetriNetConfig", "ReferenceCrossAttention", "ControlNetUNet",
           "ControlNet", "ControlNetConfig", "IPAdapterUNet", "IPAdapter", "IPAdapterConfig", "ImageProjection",
           "load_ip_adapter", "official_numbers", "LOCKS", "METHODS", "MethodOptions", "build_model", "CheckpointInfo", "inspect_checkpoint",
           "load_reference_model", "generate", "png_parameters", "reference_problems", "ReferenceGuidance",
           "AttentionRecorder", "render_attention_grid"]
