//! The first planner: contiguous layer ranges in proportion to each worker's speed, capped
//! by its memory.
//!
//! Speed is the memory bandwidth a worker measured (decode reads every weight byte of a
//! stage once per step, so a stage's time is its bytes over its bandwidth); memory is its
//! free RAM. Layers are handed out by largest remainder on the bandwidth shares, every
//! stage gets at least one layer, then layers move from a stage over its memory to the
//! neighbour with the most room. A later planner sizes by bytes, devices and links.

use std::ops::Range;

/// What the planner needs to know about one worker.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerCaps {
    pub name: String,
    /// Bytes this worker may fill with weights (0: unknown, not checked).
    pub free_bytes: u64,
    /// Relative speed (bytes per second of memory bandwidth).
    pub bandwidth: u64,
}

/// One pipeline stage: worker index and the part of the model it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagePlan {
    pub worker: usize,
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
}

/// The sizes of the model's parts, from the GGUF header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSizes {
    /// Bytes of each decoder block.
    pub layers: Vec<u64>,
    pub embed: u64,
    pub head: u64,
}

/// Plans one stage per worker, in worker order. Fails when there are more workers than
/// layers or the model does not fit.
pub fn plan(m: &ModelSizes, workers: &[WorkerCaps]) -> Result<Vec<StagePlan>, String> {
    let n_layer = m.layers.len();
    let s = workers.len();
    if s == 0 {
        return Err("no workers to place the model on".into());
    }
    if s > n_layer {
        return Err(format!("{s} workers but the model has only {n_layer} layers"));
    }
    // Largest remainder on the bandwidth shares, at least one layer each.
    let total_bw: f64 = workers.iter().map(|w| w.bandwidth.max(1) as f64).sum();
    let spare = n_layer - s;
    let ideal: Vec<f64> = workers.iter().map(|w| spare as f64 * w.bandwidth.max(1) as f64 / total_bw).collect();
    let mut counts: Vec<usize> = ideal.iter().map(|x| 1 + x.floor() as usize).collect();
    let mut left = n_layer - counts.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..s).collect();
    order.sort_by(|&a, &b| (ideal[b] - ideal[b].floor()).total_cmp(&(ideal[a] - ideal[a].floor())).then(a.cmp(&b)));
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    // Move layers off stages that do not fit their worker's memory.
    let bytes = |counts: &[usize], i: usize| -> u64 {
        let start: usize = counts[..i].iter().sum();
        let mut b: u64 = m.layers[start..start + counts[i]].iter().sum();
        if i == 0 {
            b += m.embed;
        }
        if i == s - 1 {
            b += m.head;
        }
        b
    };
    let fits = |counts: &[usize], i: usize| workers[i].free_bytes == 0 || bytes(counts, i) <= workers[i].free_bytes;
    for _ in 0..n_layer * s {
        let Some(i) = (0..s).find(|&i| !fits(&counts, i)) else { break };
        if counts[i] <= 1 {
            break;
        }
        let room = |j: usize| workers[j].free_bytes.saturating_sub(bytes(&counts, j));
        let to = [i.wrapping_sub(1), i + 1].into_iter().filter(|&j| j < s).max_by_key(|&j| room(j));
        let Some(to) = to else { break };
        counts[i] -= 1;
        counts[to] += 1;
        if !fits(&counts, to) {
            break;
        }
    }
    if let Some(i) = (0..s).find(|&i| !fits(&counts, i)) {
        let need: u64 = m.layers.iter().sum::<u64>() + m.embed + m.head;
        let have: u64 = workers.iter().map(|w| w.free_bytes).sum();
        return Err(format!(
            "the model does not fit: stage {i} on {} needs {} bytes but {} are free (model {need} bytes, workers {have} bytes free)",
            workers[i].name,
            bytes(&counts, i),
            workers[i].free_bytes
        ));
    }
    let mut out = Vec::with_capacity(s);
    let mut start = 0;
    for (i, &c) in counts.iter().enumerate() {
        out.push(StagePlan { worker: i, layers: start..start + c, embed: i == 0, head: i == s - 1 });
        start += c;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(bw: u64, free: u64) -> WorkerCaps {
        WorkerCaps { name: format!("w{bw}"), free_bytes: free, bandwidth: bw }
    }

    fn sizes(n: usize) -> ModelSizes {
        ModelSizes { layers: vec![10; n], embed: 5, head: 5 }
    }

    fn ranges(p: &[StagePlan]) -> Vec<Range<usize>> {
        p.iter().map(|s| s.layers.clone()).collect()
    }

    #[test]
    fn equal_workers_split_evenly_and_contiguously() {
        let p = plan(&sizes(30), &[w(1, 0), w(1, 0), w(1, 0)]).unwrap();
        assert_eq!(ranges(&p), vec![0..10, 10..20, 20..30]);
        assert!(p[0].embed && !p[0].head && p[2].head && !p[1].embed);
    }

    #[test]
    fn faster_workers_get_more_layers() {
        let p = plan(&sizes(30), &[w(100, 0), w(200, 0)]).unwrap();
        assert_eq!(ranges(&p), vec![0..10, 10..30]);
        let p = plan(&sizes(7), &[w(1, 0), w(1000, 0)]).unwrap();
        assert_eq!(ranges(&p), vec![0..1, 1..7], "every stage keeps a layer");
    }

    #[test]
    fn memory_caps_move_layers_to_neighbours() {
        // The fast worker fits only 10 layers (+ embed).
        let p = plan(&sizes(30), &[w(1000, 105), w(1, 1000)]).unwrap();
        assert_eq!(ranges(&p), vec![0..10, 10..30]);
    }

    #[test]
    fn too_big_or_too_many_workers_is_said_plainly() {
        let e = plan(&sizes(30), &[w(1, 100), w(1, 100)]).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        let e = plan(&sizes(2), &[w(1, 0), w(1, 0), w(1, 0)]).unwrap_err();
        assert!(e.contains("only 2 layers"), "{e}");
    }
}
