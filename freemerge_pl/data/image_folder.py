"""An image-classification task stored as ``<root>/<split>/<class>/<image>`` (torchvision ImageFolder layout).

Images are read as RGB and go through open_clip's evaluation preprocessing: Resize (bicubic, shorter
side) → CenterCrop → ToTensor → Normalize with OpenAI CLIP's mean and std. Labels are the class folders'
positions in ``classes`` (default: the folder names sorted, as ImageFolder does); they must follow the
classification head's class order.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from freemerge_pl.errors import ConfigError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_eval_transform(image_size: int, mean, std):
    """open_clip's evaluation preprocessing (``image_transform(..., is_train=False)`` with its defaults)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ])


class ImageFolderTask(Dataset):
    """One task's split: ``<root>/<split>/<class>/*`` → ``(image [3, S, S], label)``; ``num_classes`` attribute.

    ``classes`` (optional) gives the class folders in label order (the head's order); default: sorted
    folder names. The folder is listed at construction (the data module constructs datasets in
    ``setup``, after the config is parsed) and a missing folder or class raises a ConfigError naming it.
    """

    def __init__(
        self,
        root: str,
        split: str = "train",
        image_size: int = 224,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        classes: list[str] | None = None,
    ) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset

        self.root, self.split = str(root), split
        directory = Path(root) / split
        if not directory.is_dir():
            raise ConfigError(f"ImageFolderTask: {directory} does not exist or is not a directory "
                              f"(expected {Path(root) / split}/<class>/<image> files)")
        found = sorted(e.name for e in directory.iterdir() if e.is_dir())
        if classes is None:
            classes = found
        else:
            absent = [c for c in classes if c not in found]
            if absent:
                raise ConfigError(f"ImageFolderTask: class folder(s) {absent[:10]} are not in {directory}")
        if not classes:
            raise ConfigError(f"ImageFolderTask: {directory} holds no class folders")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = make_dataset(str(directory), self.class_to_idx, extensions=IMG_EXTENSIONS,
                                    allow_empty=True)
        if not self.samples:
            raise ConfigError(f"ImageFolderTask: no images ({', '.join(IMG_EXTENSIONS)}) under {directory}")
        self.num_classes = len(self.classes)
        self.image_size = image_size
        self.transform = clip_eval_transform(image_size, mean or OPENAI_CLIP_MEAN, std or OPENAI_CLIP_STD)
        self._loader = default_loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(self._loader(path)), label

    def __repr__(self) -> str:
        return (f"ImageFolderTask(root={self.root!r}, split={self.split!r}, {len(self)} images, "
                f"{self.num_classes} classes)")


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "ImageFolderTask", "clip_eval_transform"]
