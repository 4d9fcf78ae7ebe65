"""Qt parts of the module panel that have a concept of their own (layer 3, beside AnomalyFlag.py): the Review
section, and the slice lists the panel shows. They run only inside the Slicer application; what they show
comes from the Qt-free controllers of AnomalyFlagMRML.
"""
