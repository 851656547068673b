"""Image-classification tasks on disk: an ImageFolder tree, or the task_vectors data layout.

* ``ImageFolderTask``: ``<root>/<split>/<class>/<image>`` (torchvision ImageFolder layout).
* ``TaskVectorsTask``: the folders task_vectors (Ilharco et al. 2023) and the merging papers that reuse its
  code (FREE-Merging, EMR-Merging, AdaMerging) read under one ``location`` (see ``TASK_VECTORS_LAYOUT``).

Images are read as RGB and go through CLIP's evaluation preprocessing: Resize (shorter side, bicubic) →
CenterCrop → ToTensor → Normalize. By default with OpenAI CLIP's mean and std at 224 px (open_clip's
``image_transform(..., is_train=False)``); ``preprocessor_config`` takes size, crop, resampling, mean and std
from a Hugging Face ``preprocessor_config.json`` (a ``CLIPImageProcessor``'s: pass the model directory, e.g.
``HFCLIPAdapter.preprocessor_config``), so the data match the model's own preprocessing. Labels must follow
the classification head's class order.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from freemerge_pl.errors import ConfigError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: PIL resampling codes as Hugging Face image processors store them (``resample``)
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing: shorter side resized to ``resize_size``, centre crop ``crop_size``, normalised."""

    crop_size: int = 224
    resize_size: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"


def _side(value, key: str, path: Path) -> int:
    """One side from a HF size field: an int, ``{"shortest_edge": n}`` or ``{"height": h, "width": w}`` (h == w)."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise ConfigError(f"{path}: {key}={value!r} is not a square size (int, shortest_edge, or height == width)")


def preprocessing_from_config(path: str | Path) -> Preprocessing:
    """The evaluation preprocessing a Hugging Face ``preprocessor_config.json`` (file, or a directory holding one)
    describes: ``size`` (shorter side), ``crop_size``, ``resample``, ``image_mean``, ``image_std``."""
    path = Path(path)
    if path.is_dir():
        path = path / "preprocessor_config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"preprocessor_config: {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"preprocessor_config: {path} cannot be read as JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"preprocessor_config: {path} does not hold a JSON object")
    for flag in ("do_resize", "do_center_crop", "do_normalize", "do_rescale"):
        if raw.get(flag, True) is not True:
            raise ConfigError(f"{path}: {flag}=false is not supported (resize, centre crop, rescale and "
                              f"normalize are always applied)")
    if abs(float(raw.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ConfigError(f"{path}: rescale_factor={raw['rescale_factor']} is not 1/255")
    resample = raw.get("resample", 3)
    if resample not in RESAMPLE_NAMES:
        raise ConfigError(f"{path}: resample={resample!r}; accepted: {sorted(RESAMPLE_NAMES)}")
    crop = _side(raw.get("crop_size", raw.get("size", 224)), "crop_size", path)
    resize = _side(raw.get("size", crop), "size", path)
    mean, std = tuple(raw.get("image_mean", OPENAI_CLIP_MEAN)), tuple(raw.get("image_std", OPENAI_CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"{path}: image_mean and image_std must have 3 entries (RGB)")
    return Preprocessing(crop_size=crop, resize_size=resize, mean=mean, std=std,
                         interpolation=RESAMPLE_NAMES[resample])


def resolve_preprocessing(image_size: int | None, mean: list[float] | None, std: list[float] | None,
                          preprocessor_config: str | None) -> Preprocessing:
    """``preprocessor_config`` (when given) overridden by any explicit ``image_size``/``mean``/``std``."""
    base = preprocessing_from_config(preprocessor_config) if preprocessor_config else Preprocessing()
    size = image_size or base.crop_size
    resize = base.resize_size if image_size is None or image_size == base.crop_size else image_size
    return Preprocessing(crop_size=size, resize_size=resize, mean=tuple(mean or base.mean),
                         std=tuple(std or base.std), interpolation=base.interpolation)


def clip_eval_transform(image_size: int, mean, std, resize_size: int | None = None,
                        interpolation: str = "bicubic"):
    """CLIP's evaluation preprocessing (open_clip's ``image_transform(..., is_train=False)`` with its defaults;
    a ``CLIPImageProcessor`` with ``resize_size`` = its shortest edge and ``image_size`` = its crop)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(resize_size or image_size, interpolation=T.InterpolationMode(interpolation)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ])


class _ImageTask(Dataset):
    """``samples`` [(path, label)] read as RGB through the preprocessing; ``num_classes``, ``classes``."""

    samples: list[tuple[str, int]]
    classes: list[str]

    def _setup_transform(self, image_size, mean, std, preprocessor_config) -> None:
        from torchvision.datasets.folder import default_loader

        pre = resolve_preprocessing(image_size, mean, std, preprocessor_config)
        self.image_size = pre.crop_size
        self.preprocessing = pre
        self.transform = clip_eval_transform(pre.crop_size, pre.mean, pre.std, pre.resize_size,
                                             pre.interpolation)
        self._loader = default_loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(self._loader(path)), label


def _class_folders(directory: Path, classes: list[str] | None, who: str) -> list[str]:
    if not directory.is_dir():
        raise ConfigError(f"{who}: {directory} does not exist or is not a directory "
                          f"(expected {directory}/<class>/<image> files)")
    found = sorted(e.name for e in directory.iterdir() if e.is_dir())
    if classes is None:
        classes = found
    else:
        absent = [c for c in classes if c not in found]
        if absent:
            raise ConfigError(f"{who}: class folder(s) {absent[:10]} are not in {directory}")
    if not classes:
        raise ConfigError(f"{who}: {directory} holds no class folders")
    return list(classes)


def _folder_samples(directory: Path, classes: list[str], who: str, is_valid_file=None) -> list[tuple[str, int]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    samples = make_dataset(str(directory), {c: i for i, c in enumerate(classes)},
                           extensions=None if is_valid_file else IMG_EXTENSIONS, is_valid_file=is_valid_file,
                           allow_empty=True)
    if not samples:
        raise ConfigError(f"{who}: no images ({', '.join(IMG_EXTENSIONS)}) under {directory}")
    return samples


class ImageFolderTask(_ImageTask):
    """One task's split: ``<root>/<split>/<class>/*`` → ``(image [3, S, S], label)``; ``num_classes`` attribute.

    ``classes`` (optional) gives the class folders in label order (the head's order); default: sorted
    folder names. ``image_size`` (default 224, or the crop of ``preprocessor_config``), ``mean``/``std``
    (default OpenAI CLIP's, or ``preprocessor_config``'s), ``preprocessor_config``: a HF
    ``preprocessor_config.json`` or the model directory holding it (see the module docstring). The folder is
    listed at construction (the data module constructs datasets in ``setup``, after the config is parsed) and a
    missing folder or class raises a ConfigError naming it.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        image_size: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        classes: list[str] | None = None,
        preprocessor_config: str | None = None,
    ) -> None:
        self.root, self.split = str(root), split
        directory = Path(root) / split
        self.classes = _class_folders(directory, classes, "ImageFolderTask")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = _folder_samples(directory, self.classes, "ImageFolderTask")
        self.num_classes = len(self.classes)
        self._setup_transform(image_size, mean, std, preprocessor_config)

    def __repr__(self) -> str:
        return (f"ImageFolderTask(root={self.root!r}, split={self.split!r}, {len(self)} images, "
                f"{self.num_classes} classes)")


#: where task_vectors' dataset classes read each task under ``location`` (train split, test split); the test
#: split of SUN397 and DTD is their ``val`` folder, as there. ``torchvision`` marks tasks read by
#: torchvision's own dataset class (``download=False``; the layout is torchvision's under that folder).
TASK_VECTORS_LAYOUT: dict[str, str] = {
    "SUN397": "sun397/{train,val}/<class>/<image> (ImageFolder; test = val)",
    "DTD": "dtd/{train,val}/<class>/<image> (ImageFolder; test = val)",
    "EuroSAT": "EuroSAT_splits/{train,test}/<class>/<image> (ImageFolder)",
    "RESISC45": "resisc45/NWPU-RESISC45/<class>/<image> + resisc45/resisc45-{train,test}.txt (file names)",
    "GTSRB": "gtsrb/GTSRB/Training/<class>/*.ppm; gtsrb/GTSRB/Final_Test/Images + gtsrb/GT-final_test.csv",
    "Cars": "stanford_cars/ (torchvision StanfordCars: devkit/, cars_train/, cars_test/, .mat annotations)",
    "MNIST": "MNIST/raw/ (torchvision MNIST)",
    "SVHN": "svhn/{train,test}_32x32.mat (torchvision SVHN)",
    "CIFAR10": "cifar-10-batches-py/ (torchvision CIFAR10)",
    "CIFAR100": "cifar-100-python/ (torchvision CIFAR100)",
    "STL10": "stl10/stl10_binary/ (torchvision STL10)",
}
TaskVectorsName = Literal["SUN397", "DTD", "EuroSAT", "RESISC45", "GTSRB", "Cars", "MNIST", "SVHN", "CIFAR10",
                          "CIFAR100", "STL10"]
_FOLDER_TASKS = {"SUN397": ("sun397", "val"), "DTD": ("dtd", "val"), "EuroSAT": ("EuroSAT_splits", "test")}


class TaskVectorsTask(_ImageTask):
    """One task's split in the task_vectors data layout under ``location`` (``TASK_VECTORS_LAYOUT``).

    Labels are those task_vectors' classes give (sorted class folders; torchvision's label numbering), which is
    the class order of the task_vectors heads and of the shipped class names (``freemerge_pl.data.tasks``).
    Preprocessing arguments as ``ImageFolderTask``. Nothing is downloaded: a missing folder raises a
    ConfigError naming the path expected.
    """

    def __init__(
        self,
        location: str,
        task: TaskVectorsName,
        split: Literal["train", "test"] = "train",
        image_size: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        preprocessor_config: str | None = None,
    ) -> None:
        if task not in TASK_VECTORS_LAYOUT:
            raise ConfigError(f"TaskVectorsTask: task={task!r}; accepted: {list(TASK_VECTORS_LAYOUT)}")
        if split not in ("train", "test"):
            raise ConfigError(f"TaskVectorsTask: split={split!r}; accepted: ['train', 'test']")
        self.location, self.task, self.split = str(location), task, split
        self._setup_transform(image_size, mean, std, preprocessor_config)
        who = f"TaskVectorsTask({task}, {split})"
        root = Path(location)
        self._torchvision = None
        if task in _FOLDER_TASKS:
            folder, test_name = _FOLDER_TASKS[task]
            directory = root / folder / ("train" if split == "train" else test_name)
            self.classes = _class_folders(directory, None, who)
            self.samples = _folder_samples(directory, self.classes, who)
        elif task == "RESISC45":
            self.classes, self.samples = _resisc45(root, split, who)
        elif task == "GTSRB":
            self.classes, self.samples = _gtsrb(root, split, who)
        else:
            self._torchvision = _torchvision_task(root, task, split, who)
            self.classes = [str(c) for c in getattr(self._torchvision, "classes", [])]
            self.samples = []
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self._torchvision) if self._torchvision is not None else len(self.samples)

    def __getitem__(self, index: int):
        if self._torchvision is None:
            return super().__getitem__(index)
        image, label = self._torchvision[index]
        return self.transform(image.convert("RGB")), int(label)

    def __repr__(self) -> str:
        return (f"TaskVectorsTask(location={self.location!r}, task={self.task!r}, split={self.split!r}, "
                f"{len(self)} images, {self.num_classes} classes)")


def _resisc45(root: Path, split: str, who: str) -> tuple[list[str], list[tuple[str, int]]]:
    """NWPU-RESISC45 with the split lists of Neumann et al. 2019 (as task_vectors' RESISC45Dataset)."""
    listing = root / "resisc45" / f"resisc45-{split}.txt"
    try:
        names = {line.strip() for line in listing.read_text().splitlines() if line.strip()}
    except FileNotFoundError:
        raise ConfigError(f"{who}: split list {listing} does not exist") from None
    directory = root / "resisc45" / "NWPU-RESISC45"
    classes = _class_folders(directory, None, who)
    return classes, _folder_samples(directory, classes, who, is_valid_file=lambda p: Path(p).name in names)


def _gtsrb(root: Path, split: str, who: str) -> tuple[list[str], list[tuple[str, int]]]:
    """GTSRB as torchvision's (and task_vectors' copy of it) reads it: class folders for training, a CSV
    (``Filename;ClassId``) for the test images."""
    base = root / "gtsrb"
    if split == "train":
        directory = base / "GTSRB" / "Training"
        classes = _class_folders(directory, None, who)
        return classes, _folder_samples(directory, classes, who, is_valid_file=lambda p: p.endswith(".ppm"))
    table = base / "GT-final_test.csv"
    images = base / "GTSRB" / "Final_Test" / "Images"
    try:
        with open(table, newline="") as f:
            samples = [(str(images / row["Filename"]), int(row["ClassId"]))
                       for row in csv.DictReader(f, delimiter=";", skipinitialspace=True)]
    except FileNotFoundError:
        raise ConfigError(f"{who}: {table} does not exist") from None
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{who}: {table} is not a Filename;ClassId table ({err})") from None
    if not samples:
        raise ConfigError(f"{who}: {table} lists no images")
    classes = _class_folders(base / "GTSRB" / "Training", None, who) if (base / "GTSRB" / "Training").is_dir() \
        else [f"{i:05d}" for i in range(43)]
    return classes, samples


def _torchvision_task(root: Path, task: str, split: str, who: str):
    from torchvision import datasets

    train = split == "train"
    makers = {
        "Cars": lambda: datasets.StanfordCars(str(root), split=split, download=False),
        "MNIST": lambda: datasets.MNIST(str(root), train=train, download=False),
        "SVHN": lambda: datasets.SVHN(str(root / "svhn"), split=split, download=False),
        "CIFAR10": lambda: datasets.CIFAR10(str(root), train=train, download=False),
        "CIFAR100": lambda: datasets.CIFAR100(str(root), train=train, download=False),
        "STL10": lambda: datasets.STL10(str(root / "stl10"), split=split, download=False),
    }
    try:
        dataset = makers[task]()
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted ..."
        raise ConfigError(f"{who}: torchvision cannot read it under {root} ({err}); expected "
                          f"{root}/{TASK_VECTORS_LAYOUT[task]}") from None
    if task == "SVHN":  # torchvision's SVHN has no class list; labels are the digits 0-9
        dataset.classes = [str(i) for i in range(10)]
    return dataset


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "TASK_VECTORS_LAYOUT", "ImageFolderTask", "Preprocessing",
           "TaskVectorsTask", "clip_eval_transform", "preprocessing_from_config", "resolve_preprocessing"]
