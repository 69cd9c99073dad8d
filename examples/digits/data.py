"""Provide a LightningDataModule over scikit-learn's 8x8 handwritten digits."""

import lightning as L
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

# load_digits stores pixel intensities as integers in 0..16.
MAX_PIXEL_VALUE = 16.0


class DigitsDataModule(L.LightningDataModule):
    """Serve the 1797 digits from ``sklearn.datasets.load_digits`` as ``(images, labels)`` batches.

    Images are float32 tensors of shape (N, 1, 8, 8) scaled to [0, 1], and labels are int64
    class indices in 0..9. The data set ships with scikit-learn, so nothing is downloaded.

    Args:
        batch_size: Number of samples per batch.
        val_fraction: Fraction of the samples held out for validation, in (0, 1).
        seed: Seed for the stratified split and for the training-loader shuffle order.
        num_workers: Worker processes per DataLoader. 0 loads batches in the main process.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(
                f"batch_size must be a positive integer, got {batch_size}. Pass a value such as 64."
            )
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(
                f"val_fraction must lie strictly between 0 and 1, got {val_fraction}. "
                "Pass a value such as 0.2."
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 or a positive integer, got {num_workers}.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and split them into stratified training and validation sets."""
        if self.train_set is not None:
            return

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / MAX_PIXEL_VALUE
        labels = torch.tensor(digits.target, dtype=torch.int64)

        # Stratifying keeps every class in both splits at the data set's class ratios.
        train_index, val_index = train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=self.val_fraction,
            random_state=self.seed,
            stratify=labels.numpy(),
        )
        train_index = torch.from_numpy(train_index)
        val_index = torch.from_numpy(val_index)
        self.train_set = TensorDataset(images[train_index], labels[train_index])
        self.val_set = TensorDataset(images[val_index], labels[val_index])

    def train_dataloader(self) -> DataLoader:
        """Return a loader over the training split, shuffled in an order fixed by ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self._require(self.train_set),
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        """Return an unshuffled loader over the validation split."""
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        """Return an unshuffled loader over the validation split.

        NOTE: load_digits has no separate test set, so test metrics are measured on the same
        samples as validation metrics and are not an independent estimate.
        """
        return self._eval_loader()

    def _eval_loader(self) -> DataLoader:
        return DataLoader(
            self._require(self.val_set),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    @staticmethod
    def _require(dataset: TensorDataset | None) -> TensorDataset:
        if dataset is None:
            raise RuntimeError(
                "DigitsDataModule has no data yet. Call setup() first, or pass the data module "
                "to a Trainer, which calls setup() itself."
            )
        return dataset
