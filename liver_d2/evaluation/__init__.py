"""Evaluation: COCO slice metrics (detectron2's COCOEvaluator) and pictures of results."""
