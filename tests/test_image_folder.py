"""Image tasks on disk: HF preprocessor configs, the task_vectors folder layout, shipped class names."""

import json
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image

from freemerge_pl.data.image_folder import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageFolderTask,
    TaskVectorsTask,
    preprocessing_from_config,
)
from freemerge_pl.data.tasks import SUITE_ORDER, list_tasks, task_info
from freemerge_pl.errors import ConfigError


def _png(path: Path, seed: int, size=(36, 40)) -> None:
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((torch.rand(*size, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)


def _folder(directory: Path, classes: list[str], per_class: int = 2, ext: str = ".png") -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(directory / name / f"{name}_{i}{ext}", seed=c * 10 + i)


def test_preprocessor_config_matches_clip_image_processor(tmp_path):
    transformers = pytest.importorskip("transformers")
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                                                image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    processor.save_pretrained(str(tmp_path / "model"))
    pre = preprocessing_from_config(tmp_path / "model")
    assert (pre.crop_size, pre.resize_size, pre.mean, pre.interpolation) == (24, 24, (0.5, 0.4, 0.3), "bicubic")
    root = tmp_path / "task"
    for split in ("train", "test"):
        _folder(root / split, ["a", "b"])
    ds = ImageFolderTask(str(root), split="test", preprocessor_config=str(tmp_path / "model"))
    assert ds.image_size == 24 and len(ds) == 4 and ds.num_classes == 2
    x, y = ds[3]
    expected = processor(images=Image.open(ds.samples[3][0]).convert("RGB"), return_tensors="pt")["pixel_values"][0]
    assert x.shape == expected.shape == (3, 24, 24) and y == 1
    torch.testing.assert_close(x, expected, rtol=0, atol=0.03)  # both PIL/bicubic; rounding differs slightly
    explicit = ImageFolderTask(str(root), split="test", image_size=16, preprocessor_config=str(tmp_path / "model"))
    assert explicit[0][0].shape == (3, 16, 16) and explicit.preprocessing.mean == (0.5, 0.4, 0.3)
    assert ImageFolderTask(str(root), split="test").preprocessing.mean == OPENAI_CLIP_MEAN


def test_preprocessor_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.*does not exist"):
        preprocessing_from_config(tmp_path / "nope")
    bad = tmp_path / "preprocessor_config.json"
    bad.write_text(json.dumps({"size": {"height": 20, "width": 30}}))
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json.*size=.*not a square"):
        preprocessing_from_config(tmp_path)
    bad.write_text(json.dumps({"do_center_crop": False}))
    with pytest.raises(ConfigError, match="do_center_crop"):
        preprocessing_from_config(bad)


def _mnist_idx(raw: Path, prefix: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """torchvision MNIST's raw idx files (big-endian magic, sizes, uint8 data)."""
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.numpy().tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.numpy().tobytes())


@pytest.fixture(scope="module")
def location(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tv_data")
    _folder(root / "sun397" / "train", ["abbey", "airport"])
    _folder(root / "sun397" / "val", ["abbey", "airport"], per_class=1)
    _folder(root / "EuroSAT_splits" / "test", ["AnnualCrop", "Forest", "River"], per_class=1)
    _folder(root / "resisc45" / "NWPU-RESISC45", ["airplane", "beach"], per_class=3, ext=".jpg")
    (root / "resisc45" / "resisc45-train.txt").write_text("airplane_0.jpg\nbeach_1.jpg\nbeach_2.jpg\n")
    (root / "resisc45" / "resisc45-test.txt").write_text("airplane_1.jpg\n")
    _folder(root / "gtsrb" / "GTSRB" / "Training", ["00000", "00001"], ext=".ppm")
    _png(root / "gtsrb" / "GTSRB" / "Final_Test" / "Images" / "00000.png", seed=5)
    _png(root / "gtsrb" / "GTSRB" / "Final_Test" / "Images" / "00001.png", seed=6)
    (root / "gtsrb" / "GT-final_test.csv").write_text("Filename;Width;ClassId\n00000.png;40;1\n00001.png;40;0\n")
    g = torch.Generator().manual_seed(0)
    for prefix in ("train", "t10k"):  # torchvision checks that both splits' files exist
        _mnist_idx(root / "MNIST" / "raw", prefix, (torch.rand(5, 28, 28, generator=g) * 255).to(torch.uint8),
                   torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8))
    return root


def test_task_vectors_layout(location):
    sun_test = TaskVectorsTask(str(location), "SUN397", "test", image_size=16)  # task_vectors: test = val
    assert len(sun_test) == 2 and sun_test.classes == ["abbey", "airport"] and sun_test[1][1] == 1
    assert len(TaskVectorsTask(str(location), "SUN397", "train", image_size=16)) == 4
    eurosat = TaskVectorsTask(str(location), "EuroSAT", "test", image_size=16)
    assert eurosat.num_classes == 3 and eurosat[0][0].shape == (3, 16, 16)
    resisc_train = TaskVectorsTask(str(location), "RESISC45", "train", image_size=16)
    assert sorted((Path(p).name, y) for p, y in resisc_train.samples) == [
        ("airplane_0.jpg", 0), ("beach_1.jpg", 1), ("beach_2.jpg", 1)]
    assert [Path(p).name for p, _ in TaskVectorsTask(str(location), "RESISC45", "test").samples] == ["airplane_1.jpg"]
    gtsrb_train = TaskVectorsTask(str(location), "GTSRB", "train", image_size=16)
    assert len(gtsrb_train) == 4 and gtsrb_train.num_classes == 2
    gtsrb_test = TaskVectorsTask(str(location), "GTSRB", "test", image_size=16)
    assert [y for _, y in gtsrb_test.samples] == [1, 0] and gtsrb_test[0][0].shape == (3, 16, 16)
    mnist = TaskVectorsTask(str(location), "MNIST", "test", image_size=16)
    assert len(mnist) == 5 and mnist.num_classes == 10
    x, y = mnist[2]
    assert x.shape == (3, 16, 16) and y == 4
    pixels = x * torch.tensor(OPENAI_CLIP_STD)[:, None, None] + torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    torch.testing.assert_close(pixels[0], pixels[2], rtol=0, atol=1e-5)  # grey images come out as equal RGB


def test_task_vectors_layout_errors(location, tmp_path):
    with pytest.raises(ConfigError, match=r"DTD.*dtd/val.*does not exist"):
        TaskVectorsTask(str(location), "DTD", "test")
    with pytest.raises(ConfigError, match=r"SVHN.*svhn/\{train,test\}_32x32\.mat"):
        TaskVectorsTask(str(location), "SVHN", "train")
    with pytest.raises(ConfigError, match=r"resisc45-train\.txt does not exist"):
        TaskVectorsTask(str(tmp_path), "RESISC45", "train")
    with pytest.raises(ConfigError, match=r"task='ImageNet'"):
        TaskVectorsTask(str(location), "ImageNet")


def test_shipped_task_metadata():
    assert list_tasks(8) == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
    assert len(list_tasks(14)) == 14 and list_tasks(20) == list(SUITE_ORDER) == list_tasks()
    expected_counts = {"SUN397": 397, "Cars": 196, "RESISC45": 45, "EuroSAT": 10, "SVHN": 10, "GTSRB": 43,
                       "MNIST": 10, "DTD": 47, "Flowers102": 102, "PCAM": 2, "FER2013": 7, "OxfordIIITPet": 37,
                       "STL10": 10, "CIFAR100": 100, "CIFAR10": 10, "Food101": 101, "FashionMNIST": 10,
                       "EMNIST": 26, "KMNIST": 10, "RenderedSST2": 2}  # the datasets' published class counts
    for name in SUITE_ORDER:
        info = task_info(name)
        assert info.num_classes == expected_counts[name], name
        assert info.templates and all(t.count("{c}") == 1 for t in info.templates), name
        assert len(set(info.classnames)) == info.num_classes, name
    assert task_info("stanford-cars").name == "Cars" and task_info("oxford_flowers102").name == "Flowers102"
    assert task_info("mnist").prompts("7") == ['a photo of the number: "7".']
    with pytest.raises(ConfigError, match="ImageNet.*known tasks"):
        task_info("ImageNet")
    with pytest.raises(ConfigError, match="suite=9"):
        list_tasks(9)
