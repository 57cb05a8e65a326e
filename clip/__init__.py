"""CLIP: BPE tokenizer, text encoder (SD v1.5's conditioning), image encoder, preprocessing, loaders."""
from common.weights import detect_layout

from .loading import load_clip, load_image_encoder, load_text_encoder
from .model import (CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextTransformer, CLIPVisionConfig,
                    CLIPVisionModel, CLIPVisionModelWithProjection, CLIPVisionTransformer)
from .preprocess import CLIP_MEAN, CLIP_STD, preprocess
from .tokenizer import CLIPTokenizer

__all__ = ["CLIPTokenizer", "CLIPTextConfig", "CLIPVisionConfig", "CLIPTextModel", "CLIPVisionModel",
           "CLIPVisionModelWithProjection", "CLIPModel", "CLIPTextTransformer", "CLIPVisionTransformer",
           "preprocess", "CLIP_MEAN", "CLIP_STD", "load_text_encoder", "load_clip", "load_image_encoder",
           "detect_layout"]
