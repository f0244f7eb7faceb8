"""Medications read against one terminology and catalog, remembered (a rule set's ``medications``)."""

from __future__ import annotations

from functools import lru_cache

from d3k2.core.catalog import MedicationCatalog
from d3k2.core.dosage import Dosage, IngredientDose, Words, ingredient_dose, read_dosage
from d3k2.core.lenient import as_list, is_map
from d3k2.core.medications import NO_PRODUCT, MedicationKey, Product, classify_by_key, medication_key
from d3k2.core.terminology import Terminology


class MedicationReader:
    """Medications read against one terminology and catalog (`RuleSet.medications`), remembered.

    A patient's medication list and the drafts of an order hook name the same few products again and
    again, and reading a product name or a dose costs tens of microseconds. So each distinct
    CodeableConcept (as classification reads it) is classified once, and each (product, dosages) reading
    gets its doses once. The caches belong to this object, one per rule set, hold at most `maxsize`
    entries each and forget the least recently used; what they hold is immutable.
    """

    def __init__(
        self, terminology: Terminology, catalog: MedicationCatalog, words: Words, maxsize: int = 2048
    ) -> None:
        self.terminology = terminology
        self.catalog = catalog
        self.words = words  # cards/texts.toml [dosage]

        def classify_key(key: MedicationKey) -> Product:
            return classify_by_key(key, terminology, catalog)

        def doses(product: Product, dosages: tuple[Dosage | str, ...]) -> tuple[IngredientDose, ...]:
            return tuple(ingredient_dose(i, product, dosages, catalog, words) for i in product.ingredients)

        self._by_key = lru_cache(maxsize=maxsize)(classify_key)
        # Keyed by what was read, not by the request: equal Decimals give equal doses and equal texts.
        self._doses = lru_cache(maxsize=maxsize)(doses)

    def product(self, codeable: object) -> Product:
        if not is_map(codeable):
            return NO_PRODUCT
        return self._by_key(medication_key(codeable))

    def concepts(self, codeable: object) -> tuple[tuple[str, str, str], ...]:
        """(concept, name, matched_by) of each ingredient: what facts.MedicationClassifier answers."""
        return tuple((i.category, i.name, i.matched_by) for i in self.product(codeable).ingredients)

    def doses(self, product: Product, dosages: tuple[Dosage | str, ...]) -> tuple[IngredientDose, ...]:
        """The daily dose of each ingredient of `product` taken as `dosages` say (or why it is unknown)."""
        return self._doses(product, dosages)

    def cached(self) -> tuple[int, int]:
        """How many concepts, and how many (product, dosages) pairs, are remembered."""
        return self._by_key.cache_info().currsize, self._doses.cache_info().currsize


def medication_doses(
    medications: MedicationReader, codeable: object, dosages: object
) -> tuple[IngredientDose, ...]:
    """The daily dose of each ingredient of a medication on record as its dosage instructions say
    (MedicationRequest.dosageInstruction, MedicationStatement.dosage): the arithmetic of draft orders."""
    read = tuple(read_dosage(d, medications.catalog, medications.words) for d in as_list(dosages))
    return medications.doses(medications.product(codeable), read)
