"""Inference: fold sets (the one owner of fold files), TTA, resilient scoring, safe inference, diamonds, the submission writer."""
