"""The oracles: diffusers' and transformers' twins of this repository's models and the configs they
are built from, through the reference libraries' own code (their LDM single-file converters, their
IP-Adapter loader, their schedulers and pipeline). `python -m bench.verify` compares against them, and
so do the parity tests. diffusers and transformers are test-only dependencies (requirements-dev.txt),
so each function imports them itself: importing this module needs neither."""
from __future__ import annotations

from pathlib import Path

# Our sampler names -> diffusers' scheduler classes (the one table).
SAMPLERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
            "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def original_config(unet_cfg, vae_cfg) -> dict:
    """The LDM yaml (v1-inference.yaml) as a dict, for diffusers' single-file converters."""
    unet = dict(in_channels=unet_cfg.in_channels, out_channels=unet_cfg.out_channels,
                model_channels=unet_cfg.model_channels, attention_resolutions=list(unet_cfg.attention_resolutions),
                num_res_blocks=unet_cfg.num_res_blocks, channel_mult=list(unet_cfg.channel_mult),
                transformer_depth=unet_cfg.transformer_depth, context_dim=unet_cfg.context_dim,
                use_linear_in_transformer=unet_cfg.use_linear_in_transformer)
    if unet_cfg.num_head_channels == -1:
        unet["num_heads"] = unet_cfg.num_heads
    else:
        unet["num_head_channels"] = unet_cfg.num_head_channels
    dd = dict(double_z=vae_cfg.double_z, z_channels=vae_cfg.z_channels, resolution=vae_cfg.resolution,
              in_channels=vae_cfg.in_channels, out_ch=vae_cfg.out_ch, ch=vae_cfg.ch, ch_mult=list(vae_cfg.ch_mult),
              num_res_blocks=vae_cfg.num_res_blocks, attn_resolutions=list(vae_cfg.attn_resolutions), dropout=0.0)
    return {"model": {"params": {"scale_factor": 0.18215, "unet_config": {"params": unet},
                                 "first_stage_config": {"params": {"embed_dim": vae_cfg.embed_dim, "ddconfig": dd}}}}}


def unet_yaml(cfg) -> dict:
    """The `original_config` of a U-Net config (UNetConfig), SD v1.5's VAE beside."""
    from vae import VAEConfig
    return original_config(cfg, VAEConfig.sd15())


def vae_yaml(cfg) -> dict:
    """The `original_config` of a VAE config (VAEConfig), SD v1.5's U-Net beside."""
    from unet import UNetConfig
    return original_config(UNetConfig.sd15(), cfg)


def diffusers_unet(ours, cfg):
    """diffusers' UNet2DConditionModel holding our U-Net's weights, routed through diffusers' own LDM
    converter, on the plain matmul-softmax attention path (independent of SDPA)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from diffusers.models.attention_processor import AttnProcessor
    ckpt = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    dcfg = create_unet_diffusers_config_from_ldm(unet_yaml(cfg), ckpt)
    dcfg["norm_num_groups"] = cfg.norm_groups  # not an LDM yaml field: LDM always uses 32
    converted = convert_ldm_unet_checkpoint(ckpt, dcfg)
    ref = diffusers.UNet2DConditionModel(**dcfg).eval()
    ref.load_state_dict(converted, strict=True)
    ref.set_attn_processor(AttnProcessor())
    return ref


def diffusers_vae(ours, cfg):
    """diffusers' AutoencoderKL holding our VAE's weights, routed through diffusers' own LDM converter,
    on the plain attention path."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    from diffusers.models.attention_processor import AttnProcessor
    ckpt = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    dcfg = create_vae_diffusers_config_from_ldm(vae_yaml(cfg), ckpt)
    ref = diffusers.AutoencoderKL(**dcfg).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(ckpt, dcfg), strict=True)
    ref.set_attn_processor(AttnProcessor())
    return ref


def hf_text_config(cfg):
    """transformers' CLIPTextConfig for our CLIPTextConfig."""
    import transformers
    return transformers.CLIPTextConfig(**vars(cfg))


def single_file_parts(path: Path, configs: dict, scratch: Path):
    """diffusers' U-Net and VAE and transformers' text encoder from an LDM single file, converted by
    diffusers' own single-file code (the text encoder's keys through transformers' own loading)."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from safetensors.torch import load_file, save_file
    state = load_file(str(path))
    yaml = original_config(configs["unet"], configs["vae"])
    ucfg = create_unet_diffusers_config_from_ldm(yaml, state)
    ucfg["norm_num_groups"] = configs["unet"].norm_groups  # not a yaml field: LDM always has 32
    unet = diffusers.UNet2DConditionModel(**ucfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, ucfg), strict=True)
    vcfg = create_vae_diffusers_config_from_ldm(yaml, state)
    vae = diffusers.AutoencoderKL(**vcfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vcfg), strict=True)
    folder = scratch / "text_encoder"
    hf_text_config(configs["text_encoder"]).save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in convert_ldm_clip_checkpoint(state).items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    text, info = transformers.CLIPTextModel.from_pretrained(str(folder), output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"{path}: diffusers' converter gave no text encoder weights for {', '.join(missing[:3])}")
    return unet, vae, text


def hf_tokenizer(weights, folder: Path):
    """transformers' CLIPTokenizer from the diffusers folder `weights`' tokenizer/, else our bundled
    vocabulary (written into `folder`)."""
    import transformers
    tok = Path(weights) / "tokenizer" if weights else None
    if tok is not None and tok.is_dir():
        return transformers.CLIPTokenizer.from_pretrained(str(tok), model_max_length=77)  # SD's context length
    return bundled_hf_tokenizer(folder)


def bundled_hf_tokenizer(folder: Path):
    """transformers' CLIPTokenizer over our bundled vocabulary (written into `folder`), as SD's."""
    import transformers
    from clip.tokenizer import write_vocab_files
    vocab, merges = write_vocab_files(folder)
    return transformers.CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>", model_max_length=77)


def scheduler_config(schedule) -> dict:
    """diffusers' scheduler config for our NoiseSchedule, with SD v1.5's sampling settings (its
    scheduler_config.json: leading timesteps, offset 1, no clipping)."""
    return dict(beta_start=schedule.beta_start, beta_end=schedule.beta_end, beta_schedule="scaled_linear",
                num_train_timesteps=schedule.num_train_timesteps, set_alpha_to_one=False, skip_prk_steps=True,
                steps_offset=1, clip_sample=False, prediction_type=schedule.prediction, timestep_spacing="leading")


def diffusers_pipeline(sampler: str, schedule, *, vae, text_encoder, tokenizer, unet):
    """diffusers' StableDiffusionPipeline over the given parts with our `sampler`'s scheduler."""
    import diffusers
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=getattr(diffusers, SAMPLERS[sampler]).from_config(scheduler_config(schedule)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet_config(unet, vae_cfg) -> dict:
    """diffusers' ControlNetModel config for a ControlNet over our `unet`: the U-Net's fields as diffusers'
    converter gives them (diffusers 0.42.1's create_controlnet_diffusers_config_from_ldm calls that
    converter without its checkpoint argument, a TypeError, so the fields are taken here)."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
    ucfg = create_unet_diffusers_config_from_ldm(original_config(unet.config, vae_cfg),
                                                 {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()})
    fields = ["in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "transformer_layers_per_block"]
    return {"conditioning_channels": 3, "norm_num_groups": unet.config.norm_groups, **{k: ucfg[k] for k in fields}}


def diffusers_controlnet(path, unet, vae_cfg):
    """diffusers' ControlNetModel from an official ControlNet file, through its own converter (the
    config from our `unet`'s, as its single-file loader does)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file
    state = load_file(path)
    if not any(k.startswith("control_model.") for k in state):  # prefix-less third-party files
        state = {"control_model." + k: v for k, v in state.items()}
    cfg = controlnet_config(unet, vae_cfg)
    model = diffusers.ControlNetModel(**cfg)
    model.load_state_dict(convert_controlnet_checkpoint(state, cfg), strict=True)
    return model


def diffusers_ip_adapter(unet, official: dict, scale: float):
    """`unet` (diffusers') carrying an official-layout IP-Adapter state dict (ip-adapter_sd15's keys),
    loaded by diffusers' own IP-Adapter loader, at `scale`."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    nested = {part: {k[len(part) + 1:]: v for k, v in official.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    unet._load_ip_adapter_weights([nested], low_cpu_mem_usage=False)
    for proc in unet.attn_processors.values():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc.scale = [scale]
    return unet
