"""The translation functions of the module's user-visible text: Slicer's own in the application (``tr`` takes
its context from the calling file), the text itself where there are none (slicer-core, Slicer before 5.4)."""

try:
    from slicer.i18n import tr, translate  # noqa: F401 - re-exported
except ImportError:

    def tr(text):
        return text

    def translate(context, text):
        return text
