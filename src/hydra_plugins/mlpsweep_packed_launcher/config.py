"""The config of `hydra/launcher=packed`, registered in Hydra's ConfigStore."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.mlpsweep_packed_launcher.packed_launcher.PackedLauncher"
    # the most runs one stacked network trains; null: as many as fit (GPU: half its free memory,
    # CPU: half the free RAM)
    pack_size: int | None = None


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="mlpsweep")
