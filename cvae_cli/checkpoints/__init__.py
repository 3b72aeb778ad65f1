"""Weights in and out, by responsibility:

- files: reading safetensors, PyTorch pickles (tensors only) and released folders;
- layouts: the SD image VAE's diffusers <-> CompVis names, one table read both ways;
- hub: `owner/name[/subfolder]` on the Hugging Face hub, from the cache first;
- locations: the per-user folder and the built-in small model, when nobody names weights;
- models: load, save and describe our models;
- identity: the record that travels with a model (its id, computed when asked, and provenance).

Three kinds of weights reach this tool: Open-Sora-Plan's released video VAE (a folder of
config.json + diffusion_pytorch_model.safetensors, locally or on the hub; its keys are already
ours, `loss.*` is dropped), our own single-file `.safetensors` (the config in its metadata), and
the SD image VAE to inflate, in either layout.
"""
from .files import read_state_dict
from .hub import DEFAULT_SD_VAE, fetch_sd_vae
from .identity import model_id, provenance, set_provenance
from .layouts import check_shapes, compvis_to_diffusers, sd_vae_config, sd_vae_to_compvis
from .locations import (BUILTIN_WEIGHTS, INFLATED_WEIGHTS, builtin_weights, data_dir, default_weights,
                        inflated_weights)
from .models import config_from_json, load_model, save_model, save_sd_vae, weights_info

__all__ = ["BUILTIN_WEIGHTS", "DEFAULT_SD_VAE", "INFLATED_WEIGHTS", "builtin_weights", "check_shapes",
           "compvis_to_diffusers", "config_from_json", "data_dir", "default_weights", "fetch_sd_vae", "inflated_weights",
           "load_model", "model_id", "provenance", "read_state_dict", "save_model", "save_sd_vae", "sd_vae_config",
           "sd_vae_to_compvis", "set_provenance", "weights_info"]
