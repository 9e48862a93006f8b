"""The class-conditional digit DDPM: a small diffusers-style UNet2D config (fastarch's UNet2D
runs it; the checkpoint is in diffusers' layout, so diffusers' UNet2DModel loads it too), its
noise schedule, and sampling with DDIM and classifier-free guidance.

Classifier-free guidance: the model has 11 class embeddings, the digits 0-9 and a "no class"
label (NULL_CLASS) that training substitutes for the true label 10% of the time, so one network
gives both the conditional and the unconditional prediction.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from fastarch.generative.digits import NUM_CLASSES, check_class_labels

NULL_CLASS = NUM_CLASSES  # the class embedding that stands for "no class"

# ~0.64M parameters, attention only in the mid block (4x4): sized to train in half an hour on
# one shared CPU core
DDPM_CONFIG: dict = {
    "_class_name": "UNet2DModel",
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 32,
    "num_class_embeds": NUM_CLASSES + 1,
}

SCHEDULER_CONFIG: dict = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}
