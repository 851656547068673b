import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Tiny tensors: one thread avoids oversubscription when the 2 cores are shared.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _package_logs_reach_caplog(caplog):
    """The CLI's logging set-up (``freemerge_pl.progress.setup_logging``) stops ``freemerge_pl.*`` records
    propagating to the root logger, where caplog listens: once any test ran the CLI, caplog would miss them
    (and a test asserting that a line is absent would pass vacuously). Listen on the package logger too."""
    import logging

    logger = logging.getLogger("freemerge_pl")
    logger.addHandler(caplog.handler)
    yield
    logger.removeHandler(caplog.handler)
