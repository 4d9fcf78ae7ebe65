"""Scene bookkeeping: which scene to work in, snapshots of its node IDs, and removing what a failed or temporary
step added."""

import slicer
from AnomalyFlagLib.errors import InputError


def getScene(scene=None, node=None):
    """`scene`, else the scene of `node`, else slicer.mrmlScene; InputError when there is none."""
    scene = scene or (node.GetScene() if node is not None else None) or slicer.mrmlScene
    if scene is None:
        raise InputError("There is no MRML scene (slicer.mrmlScene is not set).")
    return scene


def nodeIds(scene) -> set:
    """IDs of every node in the scene now (compare with a later call to see what was added)."""
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def removeNodesAddedSince(scene, before):
    """Remove every node whose ID is not in `before` (clean-up after a failure or a temporary load)."""
    added = [scene.GetNodeByID(i) for i in nodeIds(scene) - set(before)]
    for node in added:
        if node is not None and node.GetScene() is scene:
            scene.RemoveNode(node)
