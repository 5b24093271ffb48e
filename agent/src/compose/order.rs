//! Service start order from `depends_on`.

/// Orders `deps` (for each service, the indexes it depends on) so that every
/// service comes after its dependencies. Stable: among services free to go,
/// the one written first goes first, so an unchanged file always gives the
/// same order. On a cycle, returns the indexes around it, the first repeated
/// at the end (`a → b → a`).
pub(crate) fn order(deps: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = deps.len();
    let mut placed = vec![false; n];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let next = (0..n).find(|&i| !placed[i] && deps[i].iter().all(|&d| placed[d]));
        match next {
            Some(i) => {
                placed[i] = true;
                out.push(i);
            }
            None => return Err(find_cycle(deps, &placed)),
        }
    }
    Ok(out)
}

/// Every unplaced service has an unplaced dependency (else it could be
/// placed), so following those from any of them must come back round.
fn find_cycle(deps: &[Vec<usize>], placed: &[bool]) -> Vec<usize> {
    let Some(start) = (0..deps.len()).find(|&i| !placed[i]) else {
        return Vec::new();
    };
    let mut path = vec![start];
    let mut current = start;
    loop {
        let Some(&next) = deps[current].iter().find(|&&d| !placed[d]) else {
            return path;
        };
        if let Some(pos) = path.iter().position(|&p| p == next) {
            let mut cycle = path.split_off(pos);
            cycle.push(next);
            return cycle;
        }
        path.push(next);
        current = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_topological_order() {
        // 0 depends on 2, 1 is free, 2 depends on 3, 3 is free.
        assert_eq!(
            order(&[vec![2], vec![], vec![3], vec![]]).unwrap(),
            [1, 3, 2, 0]
        );
        assert_eq!(order(&[vec![], vec![], vec![]]).unwrap(), [0, 1, 2]);
        assert_eq!(order(&[vec![1, 2], vec![2], vec![]]).unwrap(), [2, 1, 0]);
    }

    #[test]
    fn cycles() {
        assert_eq!(order(&[vec![1], vec![0]]).unwrap_err(), [0, 1, 0]);
        assert_eq!(order(&[vec![0]]).unwrap_err(), [0, 0]);
        // 0 is free; 1 → 2 → 3 → 1.
        assert_eq!(
            order(&[vec![], vec![2], vec![3], vec![1]]).unwrap_err(),
            [1, 2, 3, 1]
        );
        // 0 depends on the cycle without being part of it.
        assert_eq!(order(&[vec![1], vec![2], vec![1]]).unwrap_err(), [1, 2, 1]);
    }
}
