"""Probe after probe_part2_long_wd_knowledge.py (miniature/README.md, session 12; rules written before it ran): can
G's headroom be made of knowledge the student holds in part, and does the near-converged Stage 1 pass the
convergence gate?

With Stage 1's part 2 at 8,000 steps and weight decay 0.1, dev G was 89.3 / 97.0 (seeds 1 / 2), the student recalled
all 24 G entries and pass@4 added about a point: no headroom. G's knowledge is refreshed in every SFT run by the
replay snippets (600, each 24 of the 120 knowledge lines); without any replay, 500 SFT steps erased it (the issue's
probe). The lever here: `Budget.g_replay_share`, the share of replay snippets that hold G lines (1: as before; 0: G
knowledge only from pretraining, as a real model's knowledge of a disease no SFT example covers). Every arm runs
Stage 1 at `sft_steps` 8,500 and `part2_weight_decay` 0.1 (the recipe of probe_part2_long_wd.py), then dev, dev R,
dev-G pass@4, and entry recall for T / G / U after pretraining, part 1 and part 2, greedy and sampled (8 completions
at 0.7 per disease: a graded recall).

Arms, on 1 core each, 2 at a time (`taskset`), seed 1 first (the slower seed):
- share 1 (the control arm, the Budget's replay) with the convergence gate's longer part 2 (16,000 steps);
- share 0, then, by the rule below, the next share or seed.

Rule for the lever (a share qualifies on a seed iff): dev G in [30, 75] and pass@4 >= pass@1 + 15 (the headroom
gate), dev T >= 97, dev R >= 85. Order fixed in advance: share 0 on seed 1; if it qualifies, share 0 on seed 2; if
its dev G is under 30, share 0.05 on seed 1 (then seed 2 if that qualifies); if over 75, the replay share is not the
lever (G knowledge survives without replay) and no further share runs. A share that qualifies on seeds 1 and 2 is
adopted into Budget with the recipe and the next run is the three-seed table with --gates.
Rule for convergence (share 1, seed 1): the 16,000-step part 2 gains <= 2 points on dev T and on dev R over the
8,000-step one. Adoption of the recipe into Budget needs seed 2 as well (a later run) unless the gate fails here.

The noise arm (session 13; written after the share arms' results on seed 1 and before it ran). Share 0 put dev G
at 72.7 but pass@1 71.5 -> pass@4 76.7 (68.2 -> 76.3 at temperature 1.0, top-p 1.0): a G entry SFT erased is
recited wrong the same way in every sample, so forgetting makes headroom no sample can reach. Knowledge held in part
is a split belief instead: `--noise 0.5` (`Budget.g_fact_noise`) states each G disease's findings right in half of
the corpus's statements and in one fixed competing wrong version (`student.competing_findings`: one finding swapped)
in the other half, in pretraining and in replay alike (share 1); T and U stay clean. Rule: `qualifies` on seed 1 as
above. If it qualifies, seed 2 next; qualifying on both, it is adopted with the recipe and the next run is the
three-seed table with --gates. If it fails only by dev G over 75, noise 0.6 next; under 30, 0.4; if pass@4 gains
less than 15, the split belief as built is not the lever.

The small-share arm (session 13; written after the noise arm's result, dev G 98.7, and before it ran): share 0.2 on
seed 1, between share 0 (13 of 24 G entries kept, dev G 72.7, +5.2 from sampling) and share 1 (24, 94.7), where an
entry may be held in part rather than erased. Rule: `qualifies` on seed 1; if it qualifies, seed 2 next; if not,
the replay share is not the lever at 0, 0.2 or 1 and no further share runs.

The contested arm (session 14; written before it ran). Noise 0.5 gave dev G 98.7 because the question gave the
answer away: the competing version's added finding was almost never an option, so the student recited what the
options showed (in-context recitals right 2,177 of 2,180; out of context 7 of 24 G entries were the competing
version). `--contested` (`Budget.g_contested`, `exam.contested_pairs`) makes every G-subject question show the
dropped finding iff it shows the added one, so its text cannot tell the versions apart, and `--g-types 0,0,1` makes
every G question 多选 (with the dropped finding a positive and the added one a negative: each hinges on the
contested fact; a contested 诊断 does not, and a contested 否定 has one distinct question per disease). Noise 0.5,
share 1, seeds 1 and 2 in parallel (1 core each). Rule: the arm qualifies iff `qualifies` on both seeds; then it is
adopted into Budget (g_fact_noise 0.5, g_contested, g_type_weights (0, 0, 1)) and the next run is one seed's full
table with --gates (the positive-control gate). Else, by seed 1: dev G over 75 -> noise 0.7 (Stage 1's T
trajectories recite G distractors' true entries, which pulled G recall from 10 to 16 of 24 in the noise arm);
under 30 -> noise 0.4; dev G in range but pass@4 gains less than 15 -> the belief is held per disease, not per
sample, and a split corpus is not the lever; dev T under 97 or dev R under 85 -> the contested G broke Stage 1,
recorded, no further arm.

After the contested arm (session 14; written before the next two ran). Seed 1: dev G 88.3, pass@4 +3.8; seed 2:
dev G 21.0, dev R 55.0 (its reading checks broke: dev 多选 40.8, T's included; seed 2's dev R was 95.0 without the
contested G). Inside seed 1's dev-G samples, 1,147 of the 1,206 recitals of a G entry are right (8 the competing
version) while out of context 7 of 24 entries are the competing one (seed 2: 1,193 / 19; 8 of 24): Stage 1's
trajectories recite every option's entry, G distractors' included (1,881 G recitals in 2,000 trajectories), and so
teach G's true entries in the reply's own format. Two arms on seed 1, 1 core each:
- by the rule above, noise 0.7 (predicted, before it ran, to fail the same way: the chat-format recital is the
  teacher's, whatever the corpus says);
- on the mechanism, `--stage1-g-distractors 0.1` at noise 0.5 (`Budget.stage1_g_distractors`: 202 G options in
  Stage 1 instead of 1,881, every G disease at least 3 times, so the student still writes each G name).
Rule: an arm that `qualifies` on seed 1 runs seed 2 next; if both qualify, the distractor arm goes first (it removes
teacher trajectories about G, which the issue's design rules out, and keeps noise 0.5). Neither: the distractor arm's
dev G over 75 -> G's chat-format knowledge does not come from the distractor recitals alone, recorded; under 30 ->
share 0.3 next; in range with pass@4 gaining under 15 -> the belief is held per disease, not per sample.

The robustness arm (session 15; written before it ran). Session 14's seed 2 and noise-0.7 runs broke Stage 1's
reading checks (dev R 55.0, 27.2) with normal loss curves, and the adopted Stage 1 (the Budget's defaults: a clean
corpus, share 1) has been run on seeds 1 and 2 only. So: the adopted Stage 1 on seeds 3 and 4, in parallel on 1 core
each, with part 2's checkpoints kept every 1,000 steps (`--part2-save-every 1000`; the training is unchanged, since
sft.py's batches are a function of the step and the seed). Rule: Stage 1 is robust iff dev R >= 85 and dev T >= 97
on both seeds; then session 14's breaks belong to its G corpora (noise, contested), recorded, and the next probe is
where the reply-format G knowledge comes from. A seed that breaks is traced by probe_stage1_trace.py (dev R and dev
T at part 1's end and at every kept part-2 checkpoint), to tell a reading skill that never forms from one that forms
and is lost; the fix is chosen from that trace, after it, not before. The G headroom gate is reported, not expected
(a clean corpus put dev G at 89-97 before).

The no-G-distractor arm (session 15; written after probe_g_reply_recital.py and before the robustness arm's result).
Recited in the reply's own format with no question (the assistant turn opened with a 多选 trajectory's lines up to
the recital), the contested arm's seed-1 student gives G entries right 29 / competing 27 of 192 samples after
pretraining, 169 / 18 after part 1 and 178 / 3 after part 2, while out of context it stays split (133 / 50 after
part 2). With 202 Stage 1 G recitals instead of 1,881 (the distractor arm): 114 / 58 after part 1, 189 / 1 after
part 2 (out of context 104 / 64). So the teacher's recitals of G distractors' true entries, memorised over part
2's ~16 epochs, settle G in the reply's format: 202 are as good as 1,881, and the issue's "G: no teacher" is broken
by them. `--stage1-g-distractors 0`: no Stage 1 question names a G disease (nor, so, does any critique example); G
knowledge comes from the (noisy) corpus alone. Noise 0.5, contested, G all 多选, share 1, seeds 1 and 2 in
parallel (paired with the contested arm). It runs only if the robustness arm passes (else Stage 1 is fixed first).
Rule: the arm qualifies iff `qualifies` on both seeds; then it is adopted into Budget (g_fact_noise 0.5,
g_contested, g_type_weights (0, 0, 1), stage1_g_distractors 0) and the next run is one seed's full table with
--gates. Else, by the seeds that keep dev R >= 85 and dev T >= 97: dev G over 75 -> the reply-format G knowledge
does not come from the teacher's recitals alone, recorded; under 30 -> noise 0.4 next; in range with pass@4 gaining
under 15 -> the belief is held per disease, not per sample, and a split corpus is not the lever. A seed whose Stage
1 breaks (dev R < 85 or dev T < 97) is traced and recorded; the other seed's verdict stands alone.

The reading-names arm (session 18; written after the no-G-distractor arm's result and before it ran). With no G
name in any Stage 1 question, both seeds failed for a reason the arm itself made: dev T on questions with no G
option 194 / 194 and 179 / 180 (seeds 1 / 2), with a G option (T's 诊断, distractors from T and G) 49.1 / 83.3, G
option names copied into the option lines 2 of 221 and 0 of 269 (T names 338 / 339, 348 / 351), a G question's
subject named in 提取关键信息 0 and 1 of 300; dev G 8.0 / 1.7. A student that never writes a G name in Stage 1
cannot write one, so the arm asked nothing about where G's knowledge comes from. `--reading-g-names 0.25`
(`Budget.reading_g_names`, exam.reading_question): a quarter of the reading questions' diseases are named after G
diseases, with findings fresh and stated in the stem and never either finding of the contested pair, so Stage 1's
replies write G names (377 times, each G disease 6-23 times, on seed 1) and recite no G entry from memory. Noise
0.5, contested, G all 多选, share 1, `--stage1-g-distractors 0`, seeds 1 and 2 in parallel. Rule: as the
no-G-distractor arm's: qualifies on both seeds -> adopted (with reading_g_names 0.25) and the next run is one
seed's full table with --gates. Else, by the seeds that keep dev R >= 85 and dev T >= 97: dev G over 75 -> the
reply-format G knowledge does not come from the teacher's recitals alone, recorded; under 30 with the G subject
named in >= 90% of dev G replies -> the corpus's split belief does not reach the reply without the teacher's
recitals, recorded (the next lever is how the corpus states G, chosen after); under 30 with names not written ->
writing a G name after a stem does not transfer, recorded; in range with pass@4 gaining under 15 -> the belief is
held per disease, not per sample. A seed whose Stage 1 breaks is traced; the other seed's verdict stands alone.
Predicted before it ran: G subjects named in >= 90% of dev G replies, dev T >= 97 where Stage 1 reads, dev G in
range but pass@4 gaining under 15 (this arm's seeds recalled 54 / 46% of G entries greedy, 59 / 47% sampled).

The versions arm (session 19; written after the reading-names arm's result and before it ran). The reading-names
arm's fresh findings leaked into the reply's G recitals ("other" 62 / 159 of 192 after part 2, against 20 / 14
without G-named reading questions), and seed 2 copied 88 of 269 G option names after ~400 G-name writes.
`--reading-g-competing 0.5` (`Budget.reading_g_competing`, exam.reading_question): each G name in a reading question
states one of the corpus's own two versions, the competing one with chance 0.5 (the corpus's noise) and the true
entry otherwise, key by the stem, so the reply copies what the stem says and is taught no belief the corpus does not
hold; `--reading-g-names 0.5` doubles the G-name writes (749 / 761 on seeds 1 / 2, each G disease 21-43 times;
competing 391 / 362 of them). Noise 0.5, contested, G all 多选, share 1, `--stage1-g-distractors 0`, checkpoints every
1,000 part-2 steps, seeds 1 and 2 in parallel, 1 core each. Rule: qualifies on both seeds -> adopted into Budget
(g_fact_noise 0.5, g_contested, g_type_weights (0, 0, 1), stage1_g_distractors 0, reading_g_names 0.5,
reading_g_competing 0.5) and the next run is one seed's full table with --gates. Else, by the seeds that keep dev R
>= 85 and dev T >= 97: dev G over 75 -> the true entries stated in half the stems settle G in the reply (the
student keeps the version its pretraining favours, or the key's), recorded; under 30 with the G subject named in >=
90% of dev G replies and the reply-format recital split -> a split recital does not make a right 多选, recorded;
under 30 with names not written -> G-name writes after a stem do not transfer, recorded; in range with pass@4
gaining under 15 -> the belief is held per disease, not per sample. A seed whose Stage 1 breaks is traced; the other
seed's verdict stands alone. The part-2 loss over steps 2,500-3,000 is read before any evaluation (over ~0.22:
a late transition flagged). Predicted before it ran: G option names copied and G subjects named >= 90% on both
seeds; the reply-format recital after part 2 right and competing each >= 50 of 192, other <= 20; dev T >= 97 where
Stage 1 reads; dev G in [30, 75] with pass@4 >= pass@1 + 15.

The department arm (session 20; written after the versions arm's result and before it ran). Four facts: the
teacher's recitals of G distractors settle G in the reply (no headroom, sessions 13-15); with no G name in Stage 1
the student cannot write one (dev G 1.7 / 8.0); G names after stems with made-up findings leak made-up recitals
(dev G 23.0 / 8.7); G names after stems with the corpus's own versions broke Stage 1's reading on both seeds (dev R
45.5 / 70.2) and were written less. `--department 500` (`Budget.department_questions`, exam.department_split): 500
Stage 1 questions on a T or G disease's department, half "下列疾病属消化科的是" (five disease options) and half
"胃炎属于哪一科" (five department options), read off the name's organ, so the replies write G names (824 / 783 on
seeds 1 / 2, each G disease 20-49 times, ~110 of them as the subject in 提取关键信息) and no finding of any disease.
Otherwise the no-G-distractor arm: noise 0.5, contested, G all 多选, share 1, `--stage1-g-distractors 0`, no
G-named reading stems, checkpoints every 1,000 part-2 steps, seeds 1 and 2 in parallel, 1 core each. Rule: qualifies
on both seeds -> adopted into Budget (g_fact_noise 0.5, g_contested, g_type_weights (0, 0, 1), stage1_g_distractors
0, department_questions 500) and the next run is one seed's full table with --gates. Else, by the seeds that keep
dev R >= 85 and dev T >= 97: dev G over 75 -> the corpus's split belief does not survive into the reply once the
name is written, recorded; under 30 with the G subject named in >= 90% of dev G replies and the reply-format recital
split -> a split recital does not make a right 多选, recorded; under 30 with names not written -> G names written in
department questions do not transfer to the 多选's subject line, recorded; in range with pass@4 gaining under 15 ->
the belief is held per disease, not per sample. A seed whose Stage 1 breaks is traced and its dev-R errors located;
the other seed's verdict stands alone. The part-2 loss over steps 2,500-3,000 is read before any evaluation.
Predicted before it ran: G option names copied and G subjects named >= 90% on both seeds; dev R within 3 points of
the no-G-distractor arm's on the same seeds (81.3 / 92.3, so seed 1 may break by dev R as it did there); dev T >= 97
where Stage 1 reads; the reply-format recital after part 2 split, right and competing each >= 50 of 192 and other
<= 20 (no Stage 1 reply recites a G finding); dev G in [30, 75] with pass@4 >= pass@1 + 15.

The department arm on seeds 3 and 4 (session 20; written after seeds 1 and 2's results and before these ran). Seed
2 qualified (dev R 95.2, dev T 98.3, dev G 40.0, pass@1 37.9 -> pass@4 57.3), the first run of this probe to; seed 1
passed all but dev T (96.0: 诊断 with a G option 95 / 106, G option names copied 151 / 221). The rule above needs
both seeds, so the arm is not adopted on them. The same command on seeds 3 and 4, nothing changed, in parallel on
1 core each. Rule: adopted into Budget as above iff both qualify (3 of 4 seeds, the fourth a point under dev T),
and the next run is one seed's full table with --gates. One of the two: not adopted, and the next arm raises the G
option-name copy (its rule written then). Neither: the seed-2 pass does not replicate, recorded.

The department-1000 arm (session 21; written after the department arm's four seeds and before it ran). Seed 1's
miss was dev T's 诊断 with a G option (95 / 106): 151 of its 221 G option lines copied the name, and 61 of the 70
others wrote a T name in its place. Department questions are the only Stage 1 rows whose option lines write G names:
696 G option lines at `--department 500` on seed 1's exam (each G disease 13-42 times), 1,307 at `--department 1000`
(29-76 times), no finding of any disease either way. So `--department 1000`, the department arm otherwise, seeds 1
and 2 in parallel, 1 core each. Rule: qualifies on both seeds -> the same command on seeds 3 and 4 (the replication),
and the arm is adopted into Budget (department_questions 1000 with the department arm's G settings) iff those both
qualify too; then the next run is one seed's full table with --gates. One of seeds 1 and 2: not adopted, and the
miss is recorded by kind: dev T under 97 with G option names copied >= 95% -> the copy is not what dev T's 诊断
needs, recorded; with the copy still under 95% -> more writes do not make the copy, recorded; dev R under 85 -> the
reading, README item 2. Neither: 500 more department rows cost Stage 1 its checks, recorded, and 500 stays the
candidate. The part-2 loss over steps 2,500-3,000 is read before any evaluation. Predicted before it ran: G option
names copied >= 95% and G subjects named >= 90% on both seeds; dev T >= 97 where Stage 1 reads; dev R within 5
points of the department arm's on the same seed (86.7 / 95.2); dev G in [30, 75] with pass@4 >= pass@1 + 15 on both.

The department arm under a fixed tokenizer (session 22; written before it ran). Session 21 found the arms unpaired:
the student's tokenizer read train.csv's first 600 rows, which an arm's added rows change, and so the whole
pretraining changed with them. exam.tokenizer_split now draws the tokenizer's rows (tokenizer.csv) from the knowledge
base and the seed alone, so every arm on a seed shares tokenizer and pretraining. That changes every run's draw, the
candidate's included, so the candidate (`--department 500`, the department arm's command unchanged; it passed on 2
of 4 draws under the old tokenizer) runs again on seeds 1 and 2, in parallel, 1 core each. These runs are also the
paired baselines for any later Stage 1 arm on seeds 1 and 2. Rule: both qualify -> the same command on seed 3, and
the arm is adopted into Budget (the department arm's settings) iff that qualifies too; then the next run is one
seed's full table with --gates. One of the two: not adopted; the other seed's miss is recorded by kind (dev T under
97 with its G option names copied, dev R under 85 traced by probe_stage1_trace.py and its errors located by
probe_dev_r_errors.py, dev G outside [30, 75] or pass@4 short by the headroom gate), and the candidate stands at 3
of 6 draws. Neither: the candidate does not pass on a fresh draw, recorded, and README item 2's Stage 1 change comes
next, paired against these runs. The part-2 loss over steps 2,500-3,000 is read and committed before any evaluation
(session 21 found it says nothing on a department mix; recorded, not used). Predicted before it ran: one of the two
qualifies; G option names copied >= 90% and G subjects named >= 90% on both; dev G in [30, 75] on both (4 of 4
before); dev T >= 97 where Stage 1 reads.

The lookup arm (session 23; written before it ran). Seed 1's department run under the fixed tokenizer stalled at dev
R 64.5 / 69.5 / 67.2 (part-2 steps 6,000 / 7,000 / 8,000), 166 of its 197 dev-R errors first wrong where an option
line copies the stem's entry: a copy by name from the context, the skill an induction head carries. A real 7B brings
it from pretraining; the student's pretraining (knowledge lines only) never needs it, so it has to form inside part 2,
and when it forms is a draw (the transition started anywhere from step ~1,500 to ~4,500 over sessions 13-17).
`--pretrain-lookups 4800` (`Budget.pretrain_lookups`, student.lookup_records): 4,800 pretraining documents (~150
tokens each), each 8 diseases outside the knowledge base with 3-4 random findings listed as a reading stem lists
them, then each recited by name in a shuffled order; `--pretrain-steps 750` keeps the knowledge's windows seen about
as often as at 400 steps without them (5,600 windows; 750 x 16 x 5,600 / 10,400 = 6,460 against 6,400). Otherwise
the department arm under the fixed tokenizer, seeds 1 and 2 in parallel, 1 core each. This machine may draw other
runs from the same commands than session 22's (session 17), so a seed here is paired with g_deptfix_s{1,2} by its
data and tokenizer only, not by its float path. Measured beside the rule: lookup accuracy (student.lookup_accuracy,
200 held-out documents, greedy) after pretraining, part 1 and part 2; the trace of dev R and dev T every 1,000 part-2
steps (probe_stage1_trace.py). Rule: qualifies on both seeds -> the same command on seed 3, and the arm is adopted
into Budget (pretrain_lookups 4800, pretrain_steps 750, the department arm's settings) iff that qualifies too; then
the next run is one seed's full table with --gates. One of the two: not adopted, the candidate (`--department 500`)
stays at 3 of 6 draws and this arm stands at 1 of 2, the other seed's miss recorded by kind as in the fixed-tokenizer
rule. Neither: recorded by kind; with lookup accuracy after pretraining >= 90% and dev R under 85, a copy skill formed
in pretraining does not carry into the reply's option lines, recorded; under 90%, 300 steps' worth of lookups do not
form it in this student, recorded. The part-2 loss over steps 2,500-3,000 is read and committed before any
evaluation. Predicted before it ran: lookup accuracy after pretraining >= 90% on both seeds; dev R >= 50 at part-2
step 2,500 on both (an early transition: 17.7-29.5 at step 2,500 in session 17's reading runs); both qualify; entry
recall after pretraining >= 23 of 24 for T and U as before.
Stopped after pretraining (session 23, amended then, before any Stage 1 step had run): lookup accuracy after the
750 pretraining steps was 0 of 200 on both seeds (the recital is generic findings, not the listed entry), so the
lever's mechanism had failed and the arm could not tell whether a copy formed in pretraining carries into Stage 1.
Its Stage 1 did not run; instead probe_lookup_calibration.py measured how fast this student learns the copy at all
(README: session 23).

The lookup-first arm (session 24; written after the pilot's result and before it ran). Seed 1: the pilot's two
folders (probe_lookup_calibration.py: pilot_look, pretrained lookup-first, and pilot_base, the candidate) continued
from part-2 step 3,000 to part 2's end by the same command (run.py resumes sft.py from its last checkpoint, and a
batch is a function of the step and the seed, so this is the unbroken run), then read as every arm here: a pair on
one machine. Seed 2: the lookup phase through the Budget, from scratch, `--lookup-steps 9000 --lookup-names 1-5
--lookup-mix 5600 --pretrain-steps 1000` (144,000 documents in the exam's format, each seen once, then pretraining
on the 800 knowledge copies + 5,600 more lookups for 1,000 steps, the pilot's mix), otherwise the candidate's
command. Its baseline is session 22's g_deptfix_s2 (qualified: dev R 92.5, dev G 31.3, pass@4 +15.4), from another
machine, so seed 2 is judged by the gates alone, not as a pair: 2 cores hold these three runs (seed 1's two one
after the other on one core, seed 2 on the other) and not a fourth. Read first, before seed 2's Stage 1: the
lookup phase's accuracy on 2 names (student.lookup_accuracy); under 0.8 -> the phase did not form on this draw (the
calibration's formed reads were 0.885-1.0, unformed ones 0.30-0.51), seed 2 stops and gives no verdict, recorded.
Rule: pilot_look and seed 2 both qualify -> the next session runs seed 3 by seed 2's command, and the arm is adopted
into Budget (lookup_steps 9000, lookup_names 1-5, lookup_mix 5600, pretrain_steps 1000, with the department arm's
settings) iff it qualifies too; then one seed's full table with --gates. pilot_look qualifies and pilot_base does
not -> the lookup-first pretraining rescues seed 1's reading on a paired draw, recorded whatever seed 2 gives. One
of the two lookup runs qualifies -> not adopted, the other's miss recorded by kind as in the fixed-tokenizer rule.
Neither -> recorded by kind; with dev R >= 85 on both, the lookup costs G its headroom or T, recorded. Measured
beside the rule: lookup accuracy on 2 / 5 / 8 names after each stage; seed 2's part-2 loss over steps 2,500-3,000,
committed before any evaluation; pilot_look's dev R minus pilot_base's. Predicted before it ran: seed 2's phase
forms (>= 0.9 on 2 names); pilot_look dev R >= 85 and pilot_base's under 85; both lookup runs qualify; dev G in
[30, 75] on all three; lookup accuracy on 2 names after part 2 under 0.5 (the reply's option lines are not the
documents' format, and 400 knowledge-only steps erased the lookup).
Amended before any result (session 24, a minute after launch): the candidate runs on seed 2 as well
(g_deptcand_s2, the candidate's command unchanged), all four runs sharing the 2 cores, so that seed 2 has a pair on
this machine too; the rule is unchanged, and the pair's difference is measured beside it.

The candidate on seed 3 (session 24; written after the lookup-first arm's seed-1 pair and g_deptcand_s2, before
it ran). On this machine the candidate (`--department 500`, the fixed-tokenizer rule's command) qualified on seed 1
(pilot_base: dev R 92.2, dev G 37.0, pass@4 +20.3) and seed 2 (g_deptcand_s2: 94.0, 34.7, +26.3); session 22's
machine drew seed 1 failing (dev R 67.2). So the fixed-tokenizer rule's first branch is read on this machine's
pair: the same command on seed 3 (g_deptcand_s3, 1 core), and the candidate is adopted into Budget (g_fact_noise
0.5, g_contested, g_type_weights (0, 0, 1), stage1_g_distractors 0, department_questions 500, part2_weight_decay
0.1 and sft_steps 8,500 as the probe's recipe) iff it qualifies; then the next run is one seed's full table with
--gates. If not, the candidate stands at 4 of 7 draws and the miss is recorded by kind, as in that rule. Predicted:
it qualifies, with dev G in [30, 40] (the gate's floor is the tightest margin: 31.3-37.0 on the last four draws).
Result (recorded after it ran, README: session 24): dev R 80.8, not qualified, so not adopted. "4 of 7" above is a
miscount: the candidate stands at 5 of 9 draws (3 of 5 under the fixed tokenizer).

    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_share1 --share 1 --seeds 1 --longer
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_share0 --share 0 --seeds 1
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_noise05 --share 1 --noise 0.5 --seeds 1
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_share02 --share 0.2 --seeds 1
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_contest_s1 --share 1 --noise 0.5 \
        --contested --g-types 0,0,1 --seeds 1    # and the same with --seeds 2 beside it, each under taskset
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_contest07 --share 1 --noise 0.7 \
        --contested --g-types 0,0,1 --seeds 1
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_contest_d01 --share 1 --noise 0.5 \
        --contested --g-types 0,0,1 --stage1-g-distractors 0.1 --seeds 1
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/robust_s3 --share 1 \
        --part2-save-every 1000 --seeds 3    # and the same with --seeds 4 beside it, each under taskset
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_nodist_s1 --share 1 --noise 0.5 \
        --contested --g-types 0,0,1 --stage1-g-distractors 0 --part2-save-every 1000 --seeds 1    # and --seeds 2
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_readg_s1 --share 1 --noise 0.5 \
        --contested --g-types 0,0,1 --stage1-g-distractors 0 --reading-g-names 0.25 --part2-save-every 1000 \
        --seeds 1    # and --seeds 2 beside it, each under taskset
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_vers_s1 --share 1 --noise 0.5 \
        --contested --g-types 0,0,1 --stage1-g-distractors 0 --reading-g-names 0.5 --reading-g-competing 0.5 \
        --part2-save-every 1000 --seeds 1    # and --seeds 2 beside it, each under taskset
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_dept_s1 --share 1 --noise 0.5 \
        --contested --g-types 0,0,1 --stage1-g-distractors 0 --department 500 --part2-save-every 1000 \
        --seeds 1    # and --seeds 2 beside it, each under taskset; the same with --seeds 3 and --seeds 4
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_dept1k_s1 --share 1 --noise 0.5 \
        --contested --g-types 0,0,1 --stage1-g-distractors 0 --department 1000 --part2-save-every 1000 \
        --seeds 1    # and --seeds 2 beside it, each under taskset
    # session 22, under the fixed tokenizer (exam.tokenizer_split): the department arm's command again
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_deptfix_s1 --share 1 --noise 0.5 \
        --contested --g-types 0,0,1 --stage1-g-distractors 0 --department 500 --part2-save-every 1000 \
        --seeds 1    # and --seeds 2 beside it, each under taskset
    # session 23: the lookup arm, stopped after pretraining (its flags as at commit 56c058a; the lookup phase,
    # --lookup-steps, replaced them)
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_look_s1 --share 1 --noise 0.5 \
        --contested --g-types 0,0,1 --stage1-g-distractors 0 --department 500 --part2-save-every 1000 \
        --pretrain-lookups 4800 --pretrain-steps 750 --seeds 1    # and --seeds 2 beside it, each under taskset
    # session 24: the lookup-first arm; seed 1 is the pilot's two folders continued, the same command in each
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/pilot_look --share 1 --noise 0.5 \
        --contested --g-types 0,0,1 --stage1-g-distractors 0 --department 500 --part2-save-every 1000 --seeds 1
    PYTHONPATH=. python miniature/results/probe_g_replay.py --out /work/runs/g_lookfirst_s2 --share 1 --noise 0.5 \
        --contested --g-types 0,0,1 --stage1-g-distractors 0 --department 500 --part2-save-every 1000 \
        --lookup-steps 9000 --lookup-names 1-5 --lookup-mix 5600 --pretrain-steps 1000 --seeds 2
    # and the candidate's own command with --out /work/runs/g_deptcand_s2 --seeds 2 beside them
    # then the candidate's command with --out /work/runs/g_deptcand_s3 --seeds 3
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import run as R  # noqa: E402
import student  # noqa: E402
from model import load_tokenizer  # noqa: E402
from probe_reading_share import stage1_dev  # noqa: E402

RECIPE = {"sft_steps": 8500, "part2_weight_decay": 0.1}


def qualifies(r, k):
    return (R.at_most(0.30, r["dev_G"]) and R.at_most(r["dev_G"], 0.75)
            and R.at_most(r["pass@1"] + 0.15, r[f"pass@{k}"]) and r["dev_T"] >= 0.97 and r["dev_R"] >= 0.85)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--share", type=float, required=True, help="Budget.g_replay_share")
    parser.add_argument("--noise", type=float, default=0.0, help="Budget.g_fact_noise")
    parser.add_argument("--contested", action="store_true", help="Budget.g_contested")
    parser.add_argument("--g-types", default=None, help="Budget.g_type_weights, e.g. 0,0,1 (诊断, 否定, 多选)")
    parser.add_argument("--stage1-g-distractors", type=float, default=1.0, help="Budget.stage1_g_distractors")
    parser.add_argument("--reading-g-names", type=float, default=0.0, help="Budget.reading_g_names")
    parser.add_argument("--reading-g-competing", type=float, default=None, help="Budget.reading_g_competing")
    parser.add_argument("--department", type=int, default=0, help="Budget.department_questions")
    parser.add_argument("--lookup-steps", type=int, default=0, help="Budget.lookup_steps")
    parser.add_argument("--lookup-names", default="1-5", help="Budget.lookup_names")
    parser.add_argument("--lookup-mix", type=int, default=0, help="Budget.lookup_mix")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="Budget.pretrain_steps (None: its own)")
    parser.add_argument("--part2-save-every", type=int, default=0, help="Budget.part2_save_every")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--longer", action="store_true",
                        help="+ the convergence gate's longer part 2 (run.stage1_gates)")
    parser.add_argument("--quick", action="store_true", help="R.QUICK's budget: the plumbing only")
    args = parser.parse_args()
    out = Path(args.out)
    recipe = {**RECIPE, "sft_steps": R.QUICK.sft_steps} if args.quick else RECIPE
    b = dataclasses.replace(R.QUICK if args.quick else R.Budget(), g_replay_share=args.share,
                            g_fact_noise=args.noise, g_contested=args.contested,
                            stage1_g_distractors=args.stage1_g_distractors,
                            reading_g_names=args.reading_g_names, reading_g_competing=args.reading_g_competing,
                            department_questions=args.department,
                            part2_save_every=args.part2_save_every, lookup_steps=args.lookup_steps,
                            lookup_names=args.lookup_names, lookup_mix=args.lookup_mix,
                            **({"pretrain_steps": args.pretrain_steps} if args.pretrain_steps else {}),
                            g_type_weights=tuple(map(float, args.g_types.split(","))) if args.g_types else None,
                            **recipe)
    result = stage1_dev(b, out, [int(s) for s in args.seeds.split(",")])
    for seed, r in result.items():
        work = out / f"seed_{seed}"
        stage = R.Stages(work)
        keys = ("pretrain", "sft_early", "sft_template")
        r["entry_recall"] = R.entry_recalls(work, stage, keys)
        r["entry_recall_sampled"] = R.entry_recalls(work, stage, keys, samples=8)
        if b.lookup_steps:  # the first recital of held-out documents of 2, 5 and 8 names
            kb = json.loads((work / "data" / "kb.json").read_text(encoding="utf-8"))
            tokenizer = load_tokenizer(work / "student")
            r["lookup_accuracy"] = {
                f"{k}, {n} names": student.lookup_accuracy(stage.done[k]["checkpoint"], tokenizer, kb, seed=seed,
                                                           names=n)
                for k in ("lookups",) + keys for n in (2, 5, 8)}
        r["qualifies"] = qualifies(r, b.pass_k)
        if args.longer:
            early = stage.done["sft_early"]["checkpoint"]
            gates = R.stage1_gates(work, stage, b, seed, work / "stage1_part2.jsonl", early)
            r["stage1_converged"] = gates["stage1_converged"]
        r["seconds"] = {k: v["seconds"] for k, v in stage.done.items()}
        brief = {k: v for k, v in r.items() if "groups" not in k and k != "seconds"}
        print(f"seed {seed}, share {args.share:g}, noise {args.noise:g}:", json.dumps(brief), flush=True)
    (out / "probe_g_replay.json").write_text(json.dumps({"share": args.share, "noise": args.noise,
                                                         "contested": args.contested, "g_types": args.g_types,
                                                         "stage1_g_distractors": args.stage1_g_distractors,
                                                         "reading_g_names": args.reading_g_names,
                                                         "reading_g_competing": args.reading_g_competing,
                                                         "department": args.department,
                                                         "lookup_steps": args.lookup_steps,
                                                         "lookup_names": args.lookup_names,
                                                         "lookup_mix": args.lookup_mix,
                                                         "budget": dataclasses.asdict(b),
                                                         "seeds": result}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
