"""Restoration GAN plus a StyleGAN2 of the whole slice: the restoration's local maps (reconstruction,
feature, discriminative) and, as a fourth map, StyleGAN2's reconstruction residual |x - G(E(x))|.

The restoration generator restores any slice well, lesion included, except where it was corrupted;
StyleGAN2 can only draw normal anatomy, so a slice it cannot draw (a dark liver lesion changes how the
encoder places the whole slice) leaves a residual over the whole slice that the local maps miss
(docs/detector-experiments.md, section 10). Both members train in one run, each on its share of the time
budget. The local maps make the anomaly map as in any backend; the global residual is a whole-slice
component (see maps.py): kept out of the map, its pooled value is added to the slice score.
"""

import dataclasses
from dataclasses import replace
from typing import Dict

import torch

from ..config import expect
from .base import DetectorBackend, ScoreComponent, TrainingData, TrainingRun
from .composite import MemberRun, composite_config, join_configs, member_config
from .izif import residual_maps
from .restoration import RestorationArchitecture, RestorationBackend, RestorationOptions
from .stylegan2 import StyleGAN2Architecture, StyleGAN2Backend, StyleGAN2Options

GLOBAL = "global_"  # prefix of the StyleGAN2 member's options and networks


def _validate_share(self) -> None:
    expect(0 < self.global_share < 1, "global_share", "a share above 0 and below 1", self.global_share)


HybridArchitecture = composite_config(
    "HybridArchitecture",
    [("", RestorationArchitecture), (GLOBAL, StyleGAN2Architecture)],
    "The restoration GAN's architecture and, prefixed global_, StyleGAN2's.",
)
HybridOptions = composite_config(
    "HybridOptions",
    [("", RestorationOptions), (GLOBAL, StyleGAN2Options)],
    "The restoration GAN's training options and, prefixed global_, StyleGAN2's.",
    own=[("global_share", float, dataclasses.field(default=0.4, metadata={
        "help": "share of a time budget that trains the StyleGAN2 member (the rest trains the restoration GAN)"}))],
    own_validate=_validate_share,
)  # fmt: skip


class HybridBackend(DetectorBackend):
    name = "hybrid"
    summary = "restoration GAN's local maps plus a StyleGAN2 reconstruction of the whole slice"
    Architecture = HybridArchitecture
    Options = HybridOptions
    components = RestorationBackend.components + (
        ScoreComponent(
            "global",
            "StyleGAN2 residual |x - G(E(x))| of the whole slice, normalised; adds to the slice score, not "
            "drawn in the heatmap",
            1.0,
            whole_slice=True,
        ),
    )

    @classmethod
    def tiny(cls):
        (local_arch, local_opts), (global_arch, global_opts) = RestorationBackend.tiny(), StyleGAN2Backend.tiny()
        options = join_configs(HybridOptions, local_opts, global_opts)
        return join_configs(HybridArchitecture, local_arch, global_arch), options

    @classmethod
    def validate(cls, architecture, inputs):
        RestorationBackend.validate(member_config(architecture, "", RestorationArchitecture), inputs)
        StyleGAN2Backend.validate(member_config(architecture, GLOBAL, StyleGAN2Architecture), inputs)

    def __init__(self, architecture, inputs):
        super().__init__(architecture, inputs)
        self.local = RestorationBackend(member_config(architecture, "", RestorationArchitecture), inputs)
        self.stylegan = StyleGAN2Backend(member_config(architecture, GLOBAL, StyleGAN2Architecture), inputs)

    def networks(self):
        named = {GLOBAL + name: net for name, net in self.stylegan.networks().items()}
        return {**self.local.networks(), **named}

    @classmethod
    def stages(cls, options):
        share = options.global_share
        local = RestorationBackend.stages(member_config(options, "", RestorationOptions))
        stylegan = StyleGAN2Backend.stages(member_config(options, GLOBAL, StyleGAN2Options))
        return tuple(replace(s, share=s.share * (1 - share)) for s in local) + tuple(
            replace(s, share=s.share * share, steps_option=GLOBAL + s.steps_option) for s in stylegan
        )

    @torch.no_grad()
    def maps(self, x, pos, body) -> Dict[str, torch.Tensor]:
        xw = self.inputs.channels(x)
        whole = residual_maps(xw, self.stylegan._reconstruct(xw, pos))["reconstruction"]
        return {**self.local.maps(x, pos, body), "global": whole}

    def fit(self, data: TrainingData, options, run: TrainingRun) -> None:
        self.local.fit(data, member_config(options, "", RestorationOptions), MemberRun(run, ""))
        self.stylegan.fit(data, member_config(options, GLOBAL, StyleGAN2Options), MemberRun(run, GLOBAL))
