"""Diffusion for SD v1.5: the DDPM noise schedule (training's add_noise) and the samplers, each numerically equal to
the diffusers scheduler of the same method under SD v1.5's scheduler config."""
from .samplers import DDIM, PNDM, SAMPLERS, DPMSolverPP2M, Euler, EulerAncestral, Sampler, make_sampler
from .schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "Sampler", "SAMPLERS", "make_sampler", "PNDM", "DDIM", "Euler", "EulerAncestral",
           "DPMSolverPP2M"]
