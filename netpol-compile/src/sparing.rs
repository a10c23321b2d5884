//! Inserting into and removing from the large sorted `Vec`s the compiler keeps between
//! compiles (a pod entry's pointer each, an IPCACHE key each), with a bounded amount of
//! room to spare: `Vec::insert` doubles a full vector, so the first pod created after a
//! 150,000-pod sync would reserve room for 190,000 more IPCACHE keys (~6 MiB no key
//! uses). Here a full vector grows by an eighth, and one left with much more room than
//! it holds gives the room back; each element still moves O(1) times per growth, on
//! average. A vector built whole is built with that room ([`with_room`]).

/// The room a full vector of `len` elements gains: an eighth, at least 64 elements.
fn growth(len: usize) -> usize {
    (len / 8).max(64)
}

/// An empty vector for `len` elements and one growth's room: a vector built whole
/// starts with the room a full one would gain, so the first elements inserted after it
/// is built do not move it. Moving is a copy into a new buffer with the old one still
/// held (when the pod entries were held in place, 29 MiB more for the copy at 150,000
/// pods, the agent's peak then, at the first pod created after the first sync). The room
/// costs address space, not memory, until it is used.
pub(crate) fn with_room<T>(len: usize) -> Vec<T> {
    Vec::with_capacity(len + growth(len))
}

/// `Vec::insert`, growing a full vector by an eighth of its length instead of doubling.
pub(crate) fn insert<T>(vec: &mut Vec<T>, at: usize, element: T) {
    if vec.len() == vec.capacity() {
        vec.reserve_exact(growth(vec.len()));
    }
    vec.insert(at, element);
}

/// `Vec::remove`, then giving room back when more than half of the vector (and more
/// than the growth of a small one) is unused; what is kept is one growth's room.
pub(crate) fn remove<T>(vec: &mut Vec<T>, at: usize) -> T {
    let element = vec.remove(at);
    let len = vec.len();
    if vec.capacity() > 2 * len + growth(0) {
        vec.shrink_to(len + growth(len));
    }
    element
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_vector_grows_by_an_eighth_not_by_double() {
        let mut vec: Vec<u32> = Vec::with_capacity(8_000);
        vec.extend(0..8_000);
        insert(&mut vec, 4_000, 7);
        assert_eq!(vec.len(), 8_001);
        assert_eq!(vec[4_000], 7);
        assert!(
            vec.capacity() >= 8_001 && vec.capacity() <= 9_000 + 8,
            "capacity {}",
            vec.capacity()
        );
        let grown = vec.capacity();
        while vec.len() < grown {
            insert(&mut vec, 0, 1);
        }
        assert_eq!(vec.capacity(), grown, "no growth until it is full again");
    }

    #[test]
    fn a_vector_built_with_room_takes_an_eighth_more_without_moving() {
        let mut vec: Vec<u64> = with_room(80_000);
        vec.extend(0..80_000);
        let at = vec.as_ptr();
        for i in 0..10_000 {
            insert(&mut vec, 40_000, i);
        }
        assert_eq!(vec.as_ptr(), at, "not moved");
        insert(&mut vec, 0, 0);
        assert!(vec.capacity() > 90_000, "then it grows");
    }

    #[test]
    fn a_vector_emptied_by_removals_gives_its_room_back_and_keeps_its_order() {
        let mut vec: Vec<u32> = (0..10_000).collect();
        for _ in 0..9_000 {
            remove(&mut vec, 500);
        }
        assert_eq!(vec.len(), 1_000);
        assert!(vec[..500].iter().copied().eq(0..500));
        assert!(vec[500..].iter().copied().eq(9_500..10_000));
        assert!(
            vec.capacity() <= 2 * 1_000 + 64,
            "capacity {} for 1,000 elements",
            vec.capacity()
        );
    }

    #[test]
    fn small_vectors_fill_and_empty_without_reallocating_at_every_step() {
        let mut vec: Vec<u32> = Vec::new();
        let mut reallocations = 0;
        for i in 0..200 {
            let before = vec.capacity();
            let end = vec.len();
            insert(&mut vec, end, i);
            reallocations += usize::from(vec.capacity() != before);
        }
        for _ in 0..200 {
            let before = vec.capacity();
            remove(&mut vec, 0);
            reallocations += usize::from(vec.capacity() != before);
        }
        assert!(
            reallocations <= 12,
            "{reallocations} reallocations in 400 steps"
        );
        assert!(vec.is_empty());
    }
}
