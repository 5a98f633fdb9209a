"""ganslim plug-in for junyanz/pytorch-CycleGAN-and-pix2pix: copy this file into the repository's
``models/`` folder (nothing else changes), then

    python train.py --model ganslim --teacher_checkpoint checkpoints/facades_pix2pix/latest_net_G.pth \
        --dataroot ./datasets/facades --name facades_slim --direction BtoA --target_macs 0.1
    python test.py --model ganslim --dataroot ./datasets/facades --name facades_slim --direction BtoA

See adapters/pix2pix/README.md in the ganslim source tree. The logic lives in ganslim.adapters.pix2pix.
"""
from ganslim.adapters.pix2pix import make_model_class

from . import find_model_using_name, networks
from .base_model import BaseModel

GanslimModel = make_model_class(BaseModel, networks, find_model_using_name)
