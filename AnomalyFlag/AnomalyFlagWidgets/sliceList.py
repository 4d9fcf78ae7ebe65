"""A QListWidget of slices: one row per slice, the slice index kept in the row's user data."""

import qt


def fillSliceList(listWidget, items, selected=None) -> None:
    """Replace the rows by `items` ((text, slice index) pairs) without emitting signals; the row of slice
    `selected` becomes current."""
    listWidget.blockSignals(True)
    listWidget.clear()
    for text, sliceIndex in items:
        item = qt.QListWidgetItem(text)
        item.setData(qt.Qt.UserRole, int(sliceIndex))
        listWidget.addItem(item)
        if sliceIndex == selected:
            listWidget.setCurrentItem(item)
    listWidget.blockSignals(False)


def sliceOfItem(item):
    """The slice index of a row (None for no row)."""
    return None if item is None else int(item.data(qt.Qt.UserRole))


def selectSlice(listWidget, sliceIndex) -> None:
    """Make the row of `sliceIndex` current (emitting currentRowChanged); nothing when it is not listed."""
    for row in range(listWidget.count):
        if sliceOfItem(listWidget.item(row)) == sliceIndex:
            listWidget.setCurrentRow(row)
            return
