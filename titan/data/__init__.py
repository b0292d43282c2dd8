"""Data: the label-CSV contract and Ids, images, datasets, augmentation, faces and alignment."""
